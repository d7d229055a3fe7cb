"""Gossip end to end on the tiny model: every number in the records is the length of a real peer
message (the loop's in-process relay costs nothing), each message is counted once, and every
peer ends with its own exported adapter."""

import math

import pytest
import torch

from fedtune.codecs import serialize
from fedtune.recipes.federated import run_federated
from fedtune.report import io


def test_gossip_records_the_peer_messages_it_mixes(tiny_cfg) -> None:
    # 3 of the 4 clients a round: on the ring the round's peers form a path, 2 edges, 4 messages
    cfg = tiny_cfg("strategy.name=gossip", "rounds=2", "train.steps=2", "sampling.fraction=0.75", name="g")
    run = run_federated(cfg, progress=False)
    recs = io.read_jsonl(run.run_dir / io.METRICS)
    state = io.load_checkpoint(run.run_dir / io.CHECKPOINT)["strategy_state"]
    size = {c: len(serialize(s)) for c, s in state["clients"].items()}
    assert len(set(size.values())) == 1  # same shapes everywhere: one message size
    (one,) = set(size.values())
    for rnd in (1, 2):
        summary = next(r for r in recs if r["round"] == rnd and r["client"] is None)
        peers = [r for r in recs if r["round"] == rnd and r["client"] is not None and r["sampled"]]
        assert len(peers) == 3 and summary["gossip_messages"] == 4
        assert summary["bytes_up"] == 4 * one and summary["bytes_down"] == 0  # each message once
        assert sorted(r["bytes_up"] // one for r in peers) == [1, 1, 2]  # the path's ends and middle
        assert sum(r["bytes_up"] for r in peers) == sum(r["bytes_down"] for r in peers) == summary["bytes_up"]
        assert summary["graph_spectral_gap"] == pytest.approx(1 - abs(1 / 3 + 2 / 3 * math.cos(math.pi / 2)))
        assert summary["spectral_gap"] == pytest.approx(1 / 3)  # the round's 3-peer path (eigenvalues 1, 2/3, 0)
        assert summary["consensus_distance"] > 0
    assert summary["cum_bytes"] == 8 * one  # round 2's summary: both rounds
    for cid in ("email", "http", "json", "logging"):
        assert (run.run_dir / "adapters" / cid / "adapter_model.safetensors").exists()


def test_push_sum_peers_train_and_export_their_de_biased_models(tiny_cfg) -> None:
    """Epidemic fan-out (directed, a fresh graph each round) with push-sum: each peer exports
    z = x / w, not its raw x; a message carries x's share and w's share."""
    from safetensors.torch import load_file

    from fedtune.strategies.decentralized import PUSH_SUM_WEIGHT

    cfg = tiny_cfg(
        "strategy.name=gossip",
        "strategy.topology=epidemic",
        "strategy.fanout=1",
        "strategy.mixing=push_sum",
        "rounds=2",
        "train.steps=1",
        name="ps",
    )
    run = run_federated(cfg, progress=False)
    recs = io.read_jsonl(run.run_dir / io.METRICS)
    state = io.load_checkpoint(run.run_dir / io.CHECKPOINT)["strategy_state"]
    w = state["weights"]
    assert w and sum(w.values()) + (4 - len(w)) == pytest.approx(4.0)  # the weights' sum is kept
    cid = next(iter(w))
    x = state["clients"][cid]
    exported = load_file(str(run.run_dir / "adapters" / cid / "adapter_model.safetensors"))
    key = next(k for k in x if k.endswith("lora_B.weight"))
    (got,) = [v for k, v in exported.items() if k.endswith(key)]
    torch.testing.assert_close(got, x[key] / w[cid])
    one = len(serialize({**x, PUSH_SUM_WEIGHT: torch.zeros(1)}))
    summary = next(r for r in recs if r["round"] == 1 and r["client"] is None)
    assert summary["gossip_messages"] == 4 and summary["bytes_up"] == 4 * one

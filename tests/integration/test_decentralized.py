"""Gossip end to end on the tiny model, through the serverless loop (`recipes/decentralized.py`):
every number in the records is the length of a real peer message, each message is counted once,
each peer's model lives in its own client state (never in the checkpoint), every peer ends with
its own exported adapter, and a resumed run equals an uninterrupted one."""

import math

import pytest
import torch

from fedtune.client.run import ClientState
from fedtune.client.store import ClientStateStore
from fedtune.codecs import serialize
from fedtune.recipes.federated import run_federated
from fedtune.report import io

PEERS = ("email", "http", "json", "logging")


def peer_states(run_dir):
    """Each peer's (x, w) as its own client state holds it (None: it never took part)."""
    store = ClientStateStore(run_dir / "clients", ClientState())
    return {c: store.get(c).peer for c in PEERS}


def test_gossip_records_the_peer_messages_it_mixes(tiny_cfg) -> None:
    # 3 of the 4 clients a round: on the ring the round's peers form a path, 2 edges, 4 messages
    cfg = tiny_cfg("strategy.name=gossip", "rounds=2", "train.steps=2", "sampling.fraction=0.75", name="g")
    run = run_federated(cfg, progress=False)
    recs = io.read_jsonl(run.run_dir / io.METRICS)
    assert sorted(io.load_checkpoint(run.run_dir / io.CHECKPOINT)) == ["init", "ledger", "round"]  # no peer model
    size = {c: len(serialize(p.x)) for c, p in peer_states(run.run_dir).items() if p is not None}
    assert len(size) >= 3 and len(set(size.values())) == 1  # same shapes everywhere: one message size
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
    for cid in PEERS:
        assert (run.run_dir / "adapters" / cid / "adapter_model.safetensors").exists()
    # `fedtune eval --all` scores each peer's own model from its client state: the last round's numbers
    from fedtune.recipes.evaluate import evaluate_all

    last = {r["client"]: r["test_loss"] for r in recs if r["round"] == 2 and r["client"] is not None}
    assert sorted(last) == list(PEERS)  # every peer is scored at the last round
    assert {r["client"]: r["test_loss"] for r in evaluate_all(run.run_dir)} == pytest.approx(last, abs=1e-6)


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
    peers = peer_states(run.run_dir)
    w = {c: p.w for c, p in peers.items() if p is not None}
    assert len(w) == 4 and sum(w.values()) == pytest.approx(4.0)  # every peer mixed; the weights' sum is kept
    cid = next(c for c in PEERS if w[c] != 1.0)
    x = peers[cid].x
    exported = load_file(str(run.run_dir / "adapters" / cid / "adapter_model.safetensors"))
    key = next(k for k in x if k.endswith("lora_B.weight"))
    (got,) = [v for k, v in exported.items() if k.endswith(key)]
    torch.testing.assert_close(got, x[key] / w[cid])
    # a message: x's tensors and w (fp64, one element)
    one = len(serialize({**x, PUSH_SUM_WEIGHT: torch.zeros(1, dtype=torch.float64)}))
    summary = next(r for r in recs if r["round"] == 1 and r["client"] is None)
    assert summary["gossip_messages"] == 4 and summary["bytes_up"] == 4 * one


def test_gossip_resumed_equals_uninterrupted(tiny_cfg, interrupt_after, no_time) -> None:
    """Killed after round 1 and resumed: the same records and the same peer models as a run that
    was never interrupted (the peers' states are versioned by round in their own store)."""
    over = ("strategy.name=gossip", "sampling.fraction=0.75", "rounds=3", "train.steps=2")
    full = run_federated(tiny_cfg(*over, name="full"), progress=False)
    cfg = tiny_cfg(*over, name="cut")
    interrupt_after(cfg, 1)
    resumed = run_federated(cfg, resume=True, progress=False)
    assert no_time(resumed.records) == no_time(full.records)
    a, b = peer_states(full.run_dir), peer_states(resumed.run_dir)
    for c in PEERS:
        assert (a[c] is None) == (b[c] is None)
        if a[c] is not None:
            assert a[c].w == b[c].w and a[c].x.keys() == b[c].x.keys()
            for k in a[c].x:
                torch.testing.assert_close(a[c].x[k], b[c].x[k], rtol=0, atol=0)


def test_a_dropped_peer_neither_trains_sends_nor_mixes(tiny_cfg) -> None:
    """Fault injection wraps the engine: a sampled peer that drops out is a recorded failure, writes
    no state that round, and the live peers mix over the ring's edges between themselves only."""
    from fedtune.engines.faults import Faults

    cfg = tiny_cfg("strategy.name=gossip", "rounds=2", "train.steps=1", "sampling.dropout=0.5", name="drop")
    run = run_federated(cfg, progress=False)
    recs = io.read_jsonl(run.run_dir / io.METRICS)
    store = ClientStateStore(run.run_dir / "clients", ClientState())
    ring = list(zip(PEERS, PEERS[1:] + PEERS[:1]))  # the ring over the sorted ids
    seen_drop = False
    for rnd in (1, 2):
        dropped = {c for c in PEERS if Faults(dropout=0.5).dropped(cfg.seed, rnd, c)}
        live = set(PEERS) - dropped
        seen_drop |= bool(dropped) and len(live) >= 2
        summary = next(r for r in recs if r["round"] == rnd and r["client"] is None)
        failed = {r["client"] for r in recs if r["round"] == rnd and r.get("failure")}
        assert failed == dropped and summary["failures"] == len(dropped)
        edges = sum(a in live and b in live for a, b in ring)
        assert summary["gossip_messages"] == 2 * edges
        for c in dropped:
            assert rnd not in store.versions(c)
    assert seen_drop  # the seed drops someone while others still gossip


def test_modest_trainers_fetch_train_and_send_to_the_aggregator(tiny_cfg) -> None:
    """MoDeST, 2 trainers and 1 aggregator a round: a round's bytes are the fetches from the last
    round's aggregator (a trainer that was it fetches nothing) plus one message per trainer that
    is not the aggregator; every peer ends with (and exports) the last round's aggregate."""
    from safetensors.torch import load_file

    from fedtune.peer_sampling import ModestSampler

    cfg = tiny_cfg("strategy.name=modest", "strategy.trainers=2", "rounds=3", "train.steps=2", name="modest")
    run = run_federated(cfg, progress=False)
    recs = io.read_jsonl(run.run_dir / io.METRICS)
    peers = peer_states(run.run_dir)
    sampler = ModestSampler(2, 1, cfg.seed)
    last = sampler.roles(3, PEERS).mixers[0]
    one = len(serialize(peers[last].x))  # LoRA: every tensor is trainable, so a message is all of x
    for rnd in (1, 2, 3):
        roles = sampler.roles(rnd, PEERS)
        (agg,) = roles.mixers
        before = sampler.roles(rnd - 1, PEERS).mixers[0] if rnd > 1 else None
        fetches = sum(before is not None and t != before for t in roles.trainers)
        sends = sum(t != agg for t in roles.trainers)
        summary = next(r for r in recs if r["round"] == rnd and r["client"] is None)
        assert summary["aggregated"] == 1 and summary["gossip_messages"] == sends
        assert summary["bytes_up"] == (fetches + sends) * one
    key = next(k for k in peers[last].x if k.endswith("lora_B.weight"))
    for cid in PEERS:
        exported = load_file(str(run.run_dir / "adapters" / cid / "adapter_model.safetensors"))
        (got,) = [v for k, v in exported.items() if k.endswith(key)]
        torch.testing.assert_close(got, peers[last].x[key], rtol=0, atol=0)
    # `fedtune eval --all` scores the same models (the last aggregate on every peer's data)
    from fedtune.recipes.evaluate import evaluate_all

    final = {r["client"]: r["test_loss"] for r in recs if r["round"] == 3 and r["client"] is not None}
    assert sorted(final) == list(PEERS)
    assert {r["client"]: r["test_loss"] for r in evaluate_all(run.run_dir)} == pytest.approx(final, abs=1e-6)


def test_gossip_peers_account_dp_sgd_like_clients(tiny_cfg) -> None:
    """DP-SGD on peers: each trainer's sample epsilon is the accountant's for the steps it has
    taken so far (2 a round it trained in), and the round records the worst."""
    pytest.importorskip("dp_accounting", reason="needs the dp extra")
    from fedtune.strategies.dp import epsilon

    over = ("strategy.name=gossip", "sampling.fraction=0.75", "rounds=2", "train.steps=2")
    dp = ("train.dp_sgd.noise_multiplier=1.0", "train.dp_sgd.clip=0.5")
    recs = run_federated(tiny_cfg(*over, *dp, name="dp"), progress=False).records
    trained: dict[str, int] = {}
    for rnd in (1, 2):
        peers = [r for r in recs if r["round"] == rnd and r["client"] is not None and "dp_rate" in r]
        assert len(peers) == 3
        for r in peers:
            trained[r["client"]] = trained.get(r["client"], 0) + 1
            assert r["sample_epsilon"] == pytest.approx(epsilon(r["dp_rate"], 1.0, 2 * trained[r["client"]], 1e-5))
        summary = next(r for r in recs if r["round"] == rnd and r["client"] is None)
        so_far = [r["sample_epsilon"] for r in recs if r["round"] <= rnd and "sample_epsilon" in r and r["client"]]
        assert summary["sample_epsilon"] == max(so_far)

"""FedKSeed: the server and every client replay the same global model bit for bit from the
scalars; the server regenerates each client's seed draws; a round moves under 18 KB per client."""

import math

import torch

from fedtune.client.train import TrainSpec
from fedtune.codecs import make_codec
from fedtune.strategies.base import RunContext
from fedtune.strategies.fedkseed import (
    G_KEY,
    SCALARS,
    FedKSeed,
    from_one_byte,
    one_byte,
    pro_probabilities,
    replay,
    seed_pool,
)
from fedtune.types import ClientUpdate


def test_clients_and_server_replay_the_same_model_and_seed_draws(tiny_with_lora, random_shard) -> None:
    model, w0 = tiny_with_lora()
    shard = random_shard
    ks = FedKSeed(num_seeds=64, eps=1e-3, lr=0.05, ctx=RunContext(seed=7))
    state = ks.init_state(w0)
    spec = TrainSpec(steps=6, batch_size=2)
    updates = []
    for cid in ("a", "b"):
        sent = ks.configure(1, [cid], state)[cid]
        payload, metrics, kept = ks.client_train(model, sent, w0, shard(cid), spec, 7, 1)
        assert kept is w0 and payload[SCALARS].shape == (6,) and math.isfinite(metrics["train_loss"])
        updates.append(ClientUpdate(cid, payload, 10, metrics, 0, 0))
    res = ks.aggregate(1, updates, state)
    new, state = res.global_state, res.state
    # the server regenerated each client's draws: G holds 1/2 of every client's scalars per seed
    total = sum(float(u.delta[SCALARS].sum()) for u in updates) / 2
    assert math.isclose(float(state["G"].sum()), total, rel_tol=1e-5) and int((state["G"] != 0).sum()) <= 12
    # a client replays the global model from w0 and G: bit-identical to the server's
    keys = [k for k in w0 if "lora_" in k]
    client_view = replay(w0, ks.configure(2, ["a"], state)["a"][G_KEY], seed_pool(7, 64), 0.05, keys)
    assert all(torch.equal(client_view[k], new[k]) for k in w0)
    assert any(not torch.equal(new[k], w0[k]) for k in w0)


def test_round_bytes_under_18_kb_and_one_byte_scalars() -> None:
    ks = FedKSeed(num_seeds=4096)
    state = ks.init_state({"m.lora_A.weight": torch.zeros(2, 2)})
    down, _ = make_codec("identity").encode(ks.configure(1, ["a"], state)["a"], None, torch.Generator())
    assert len(down) < 18 * 1024
    g = torch.tensor([0.37, -12.5, 1e-3, 0.0, 250.0])
    up32, _ = make_codec("identity").encode({SCALARS: g}, None, torch.Generator())
    up8, _ = make_codec("identity").encode({SCALARS: one_byte(g)}, None, torch.Generator())
    assert len(up32) - len(up8) == 3 * g.numel()
    back = from_one_byte(one_byte(g))
    assert back[3] == 0 and torch.all(torch.sign(back) == torch.sign(g))
    nz = g != 0
    assert torch.all((back[nz] / g[nz]).log().abs() <= 1 / 16 + 1e-6)  # 1/8 log resolution, rounded


def test_pro_probabilities_follow_the_history() -> None:
    abs_sum = torch.tensor([0.0, 2.0, 8.0, 3000.0])
    count = torch.tensor([0.0, 1.0, 2.0, 3.0])
    p = pro_probabilities(abs_sum, count)
    mean = torch.tensor([0.0, 2.0, 4.0, 1000.0])
    expect = torch.softmax((mean - mean.min()) / (mean.max() - mean.min()), dim=0)
    torch.testing.assert_close(p, expect)


def test_fedkseed_refuses_a_lossy_downlink(tiny_cfg) -> None:
    import pytest

    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="must arrive exactly"):
        tiny_cfg("strategy.name=fedkseed", "codec.name=fp16")


def test_full_parameter_mode_perturbs_base_weights_and_replays_bit_identically(tiny_with_lora, random_shard) -> None:
    """`full`: the seeds move dense offsets of the adapted layers' base weights (q, v here); the
    LoRA factors stay at their init; server and client replay the same offsets; the model the
    client evaluates is W0 + offset."""
    from fedtune.evaluation.metrics import evaluate_blocks
    from fedtune.models.adapters import BASE_DELTA, set_state_

    model, w0 = tiny_with_lora()
    ks = FedKSeed(num_seeds=32, eps=1e-3, lr=0.02, ctx=RunContext(seed=3), full=True)
    state = ks.init_state(w0)
    offsets = [k for k in state["w0"] if k.endswith(BASE_DELTA)]
    assert len(offsets) == 4  # q, v of 2 layers, at their weights' [out, in] shapes
    for k in offsets:
        m = k[: -len(BASE_DELTA)]
        assert state["w0"][k].shape == (w0[m + ".lora_B.weight"].shape[0], w0[m + ".lora_A.weight"].shape[1])
    shard = random_shard("a")
    before = evaluate_blocks(model, shard.train, 4, False)["loss"]
    sent = ks.configure(1, ["a"], state)["a"]
    payload, metrics, kept = ks.client_train(model, sent, w0, shard, TrainSpec(steps=8, batch_size=2), 3, 1)
    assert kept is w0 and payload[SCALARS].shape == (8,)
    res = ks.aggregate(1, [ClientUpdate("a", payload, 10, metrics, 0, 0)], state)
    new, state = res.global_state, res.state
    assert all(torch.equal(new[k], w0[k]) for k in w0)  # the adapter did not move
    assert all(float(new[k].abs().max()) > 0 for k in offsets)  # the base weights did
    client_view = replay(ks.start(w0), ks.configure(2, ["a"], state)["a"][G_KEY], seed_pool(3, 32), 0.02, offsets)
    assert all(torch.equal(client_view[k], new[k]) for k in new)
    set_state_(model, new)
    after = evaluate_blocks(model, shard.train, 4, False)["loss"]
    assert after != before
    set_state_(model, w0)  # W0 restored when the offsets are gone
    assert evaluate_blocks(model, shard.train, 4, False)["loss"] == before

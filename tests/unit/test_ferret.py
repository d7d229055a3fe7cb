"""Ferret: coordinates on shared random bases; every client that catches up on missed rounds holds
the server's global model bit for bit; the upload is far smaller than the update."""

import torch

from fedtune.client.train import TrainSpec
from fedtune.codecs import make_codec
from fedtune.strategies.base import RunContext
from fedtune.strategies.ferret import COORDS, Ferret, blocks_of, project
from fedtune.types import ClientUpdate


def test_blocks_group_consecutive_tensors_up_to_the_median() -> None:
    shapes = {
        "a": torch.Size([10]),
        "b": torch.Size([10]),
        "c": torch.Size([100]),
        "d": torch.Size([4]),
        "e": torch.Size([4]),
    }
    # sizes 10, 10, 100, 4, 4; median 10 -> limit 9: every tensor above it is alone, small ones pair up
    assert blocks_of(shapes) == [["a"], ["b"], ["c"], ["d", "e"]]


def test_projection_is_small_and_aligned_with_the_update() -> None:
    from fedtune.strategies.ferret import apply_round

    g = torch.Generator().manual_seed(0)
    delta = {"m.lora_A.weight": torch.randn(8, 64, generator=g), "m.lora_B.weight": torch.randn(64, 8, generator=g)}
    groups = blocks_of({k: v.shape for k, v in delta.items()})
    coords, counts = project(delta, groups, 64, seed=1, rnd=1)
    up, _ = make_codec("identity").encode({"c": coords, "k": counts}, None, torch.Generator())
    full, _ = make_codec("identity").encode(delta, None, torch.Generator())
    assert len(up) < len(full) / 3
    zero = {k: torch.zeros_like(v) for k, v in delta.items()}
    recon = apply_round(zero, coords, groups, 1, 1, lr=-1.0, clip=1e9)  # w - (-1) u = u
    flat_r = torch.cat([recon[k].reshape(-1) for k in sorted(delta)])
    flat_d = torch.cat([delta[k].reshape(-1) for k in sorted(delta)])
    assert float(torch.nn.functional.cosine_similarity(flat_r, flat_d, dim=0)) > 0.3  # a random sketch of D


def test_clients_catch_up_to_the_servers_model_bit_for_bit(tiny_with_lora, random_shard) -> None:
    shard = random_shard
    model, w0 = tiny_with_lora()
    fe = Ferret(bases=16, server_lr=1.0, ctx=RunContext(seed=3))
    state = fe.init_state(w0)
    spec = TrainSpec(steps=2, batch_size=2, lr=0.5)
    held = {"a": w0, "b": w0}
    for rnd, present in [(1, ["a", "b"]), (2, ["a"]), (3, ["a", "b"])]:  # b misses round 2
        ups = []
        for cid in present:
            msg = fe.configure(rnd, [cid], state)[cid]
            payload, metrics, held[cid] = fe.client_train(model, msg, held[cid], shard(cid), spec, 3, rnd)
            ups.append(ClientUpdate(cid, payload, 10, metrics, 0, 0))
        res = fe.aggregate(rnd, ups, state)
        new, state = res.global_state, res.state
    assert any(k.startswith(COORDS) for k in fe.configure(4, ["b"], state)["b"])
    # one more catch-up: a client that applies everything it missed equals the server exactly
    msg = fe.configure(4, ["b"], state)["b"]
    _, _, caught_up = fe.client_train(model, msg, held["b"], shard("b"), spec, 3, 4)
    assert all(torch.equal(caught_up[k], new[k]) for k in new)

"""Gossip (decentralized FedAvg): Metropolis-Hastings weights and spectral gaps equal their hand
computations; one gossip step on a complete graph is the uniform average; a round whose peers
are only some of the graph mixes over the edges between them, keeps their sum, and counts each
peer message once; a topology that cannot work is refused before training.

A round here is the serverless loop's exchange (`recipes.decentralized.exchange`) over the peers'
own states after their local step (x + delta), as `run_peers` runs it."""

import math

import numpy as np
import pytest
import torch

from fedtune.client.run import PeerState
from fedtune.codecs import make_codec, serialize
from fedtune.recipes.decentralized import Wire, exchange
from fedtune.strategies.base import RunContext
from fedtune.strategies.decentralized import (
    PUSH_SUM_WEIGHT,
    Gossip,
    consensus_distance,
    pack_message,
    unpack_message,
)
from fedtune.topology import TopologySpec, build_graph, metropolis_weights, mixing_matrix, spectral_gap

KEY = "m.lora_A.weight"


def peer(value: float) -> PeerState:
    """A peer after its local step from zero: x = [[v, 2v]]."""
    return PeerState({KEY: torch.tensor([[value, 2 * value]])})


def sent_bytes(per_peer) -> int:
    return sum(p["bytes_up"] for p in per_peer.values())


def test_metropolis_weights_of_a_path_by_hand() -> None:
    g = build_graph(TopologySpec("edges", edges=(("a", "b"), ("b", "c"))), ["a", "b", "c"], 0)
    w = mixing_matrix(metropolis_weights(g), ["a", "b", "c"])
    # degrees 1, 2, 1: W_ab = W_bc = 1 / (1 + 2); the rest of each row on the diagonal
    expect = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(w, expect)


@pytest.mark.parametrize("n", [5, 6, 9])
def test_ring_spectral_gap_is_the_circulant_formula(n: int) -> None:
    """On a ring every degree is 2, W = I/3 + (shift + shift^-1)/3, whose eigenvalues are
    1/3 + 2/3 cos(2 pi k / n)."""
    ids = [f"c{i}" for i in range(n)]
    w = mixing_matrix(metropolis_weights(build_graph(TopologySpec("ring"), ids, 0)), ids)
    np.testing.assert_allclose(w.sum(0), 1.0)
    np.testing.assert_allclose(w, w.T)
    lam = [abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n)]
    assert spectral_gap(w) == pytest.approx(1 - max(lam))


def test_one_step_on_a_complete_graph_is_the_uniform_average() -> None:
    ids = ("a", "b", "c", "d")
    g = Gossip(topology="complete", ctx=RunContext(client_ids=ids))
    mixed, per_peer, metrics = exchange(g, 1, {c: peer(v) for c, v in zip(ids, [1.0, -2.0, 4.0, 5.0])})
    mean = torch.tensor([[2.0, 4.0]])  # (1 - 2 + 4 + 5) / 4 = 2
    for c in ids:
        torch.testing.assert_close(mixed[c].model()[KEY], mean)
    assert metrics["spectral_gap"] == pytest.approx(1.0)
    assert metrics["consensus_distance"] == pytest.approx(0.0, abs=1e-6)
    size = len(serialize({KEY: mean}))
    assert metrics["gossip_messages"] == 12 and sent_bytes(per_peer) == 12 * size
    assert all(p == {"bytes_up": 3 * size, "bytes_down": 3 * size} for p in per_peer.values())


def test_a_round_of_some_peers_mixes_over_their_edges_and_keeps_their_sum() -> None:
    """Ring a-b-c-d-a, d does not take part: a and c lose their edge to d (its weight stays on
    their diagonal); d keeps its model; the round's peers keep their sum."""
    ids = ("a", "b", "c", "d")
    g = Gossip(topology="ring", ctx=RunContext(client_ids=ids))
    mixed, per_peer, metrics = exchange(g, 1, {"a": peer(3.0), "b": peer(6.0), "c": peer(9.0)})
    got = {c: mixed[c].model()[KEY][0, 0].item() for c in mixed}
    assert got["a"] == pytest.approx(2 / 3 * 3 + 1 / 3 * 6)
    assert got["b"] == pytest.approx((3 + 6 + 9) / 3)
    assert got["c"] == pytest.approx(2 / 3 * 9 + 1 / 3 * 6)
    assert "d" not in mixed  # d's own state is not touched
    assert got["a"] + got["b"] + got["c"] == pytest.approx(3 + 6 + 9)
    size = len(serialize({KEY: torch.zeros(1, 2)}))
    assert metrics["gossip_messages"] == 4 and sent_bytes(per_peer) == 4 * size  # a<->b, b<->c
    assert per_peer["b"] == {"bytes_up": 2 * size, "bytes_down": 2 * size}
    assert per_peer["a"] == {"bytes_up": size, "bytes_down": size} and "d" not in per_peer
    # the round mixed over the path a-b-c: eigenvalues 1, 2/3, 0 (the whole ring's gap is 2/3)
    assert metrics["spectral_gap"] == pytest.approx(1 / 3)
    assert metrics["graph_spectral_gap"] == pytest.approx(2 / 3)
    # consensus distance over the round's peers (d did not take part): a, b, c after mixing
    live = [mixed[c].model() for c in ("a", "b", "c")]
    assert metrics["consensus_distance"] == pytest.approx(consensus_distance(live))
    x = torch.tensor([[got[c], 2 * got[c]] for c in ("a", "b", "c")], dtype=torch.float64)
    assert consensus_distance(live) == pytest.approx(float(((x - x.mean(0)) ** 2).sum() / 3) ** 0.5)
    assert metrics["agg_error"] == 0.0  # no A, B pair in these messages


def test_repeated_gossip_reaches_consensus_on_the_average() -> None:
    """Peers that stop training (zero updates) converge to the average of where they started, at
    a rate no slower than the spectral gap predicts."""
    ids = tuple(f"c{i}" for i in range(8))
    g = Gossip(topology="ring", ctx=RunContext(client_ids=ids))
    start = [float(i * i) for i in range(8)]
    peers, _, metrics = exchange(g, 1, {c: peer(v) for c, v in zip(ids, start)})
    d1, gap = metrics["consensus_distance"], metrics["spectral_gap"]
    for r in range(2, 40):
        peers, _, metrics = exchange(g, r, peers)  # zero local steps: x + 0
    final = [peers[c].model()[KEY][0, 0].item() for c in ids]
    assert final == pytest.approx([sum(start) / 8] * 8, rel=1e-3)
    assert metrics["consensus_distance"] <= d1 * (1 - gap) ** 38 * 1.0001


@pytest.mark.parametrize(
    ("params", "field", "match"),
    [
        ({"topology": "regular", "degree": 3}, "strategy.degree", "peers x degree even"),
        ({"topology": "regular", "degree": 5}, "strategy.degree", "0 < degree < 5"),
        ({"topology": "erdos_renyi", "p": 0.01}, "strategy.topology", "disconnected"),
        (
            {"topology": "edges", "edges": (("c0", "c1"), ("c2", "c3"))},
            "strategy.topology",
            "3 parts: c0, c1; c2, c3; c4",
        ),
        ({"topology": "edges", "edges": (("c0", "zz"),)}, "strategy.edges", "do not exist"),
    ],
)
def test_a_topology_that_cannot_work_is_a_named_problem(params, field, match) -> None:
    ids = [f"c{i}" for i in range(5)]
    problems = Gossip(**params).network_problems(ids, seed=0)
    assert [p.field for p in problems] == [field] and match in problems[0].constraint


def test_a_working_topology_has_no_problem() -> None:
    ids = [f"c{i}" for i in range(6)]
    for params in ({}, {"topology": "complete"}, {"topology": "regular", "degree": 3}, {"topology": "erdos_renyi"}):
        assert Gossip(**params).network_problems(ids, seed=0) == []


def test_the_config_checks_refuse_what_gossip_cannot_do(tiny_cfg) -> None:
    from fedtune import components
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="has no server"):
        tiny_cfg("strategy.name=gossip", "engine.name=flower-sim")
    with pytest.raises(ConfigError, match="a stateful codec .* keeps one state per link"):
        tiny_cfg("strategy.name=gossip", "codec.name=topk")
    with pytest.raises(ConfigError, match="no server, so no downlink"):
        tiny_cfg("strategy.name=gossip", "codec.name=fp16", "downlink_codec.name=fp16")
    assert tiny_cfg("strategy.name=gossip", "codec.name=quantize").codec.name == "quantize"  # messages compress
    with pytest.raises(ConfigError, match="needs the individual updates"):
        tiny_cfg("strategy.name=gossip", "secure_aggregation=true")
    for name in ("gossip", "modest"):  # the round's sample is a seeded hash every peer computes
        with pytest.raises(ConfigError, match="no server to draw a secret sample"):
            tiny_cfg(f"strategy.name={name}", "privacy.randomness=secure")
    cfg = tiny_cfg("strategy.name=gossip", "strategy.topology=regular", "strategy.degree=3")
    problems = components.per_client_problems(cfg, ["a", "b", "c", "d", "e"])  # what validate and run check
    assert [p.field for p in problems] == ["strategy.degree"]
    assert components.per_client_problems(cfg, ["a", "b", "c", "d"]) == []


def test_mixing_lora_factors_logs_the_product_error_by_hand() -> None:
    """Complete graph of two peers, W = [[1/2, 1/2], [1/2, 1/2]]; 1x1 factors: peer a has B=1, A=1,
    peer b has B=3, A=5. Exact mix of products (1 + 15) / 2 = 8; mixed factors 2 * 3 = 6; the
    relative error is |8 - 6| / 8 = 1/4 (= the covariance term (1-2)(1-3)/2 + (3-2)(5-3)/2 = 2)."""
    ids = ("a", "b")
    g = Gossip(topology="complete", ctx=RunContext(client_ids=ids))
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    trained = {
        "a": PeerState({a: torch.ones(1, 1), b: torch.ones(1, 1)}),
        "b": PeerState({a: torch.full((1, 1), 5.0), b: torch.full((1, 1), 3.0)}),
    }
    mixed, _, metrics = exchange(g, 1, trained)
    assert metrics["agg_error"] == pytest.approx(0.25)
    assert mixed["a"].model()[a].item() == pytest.approx(3.0)


def test_frozen_shared_factors_are_not_sent_between_peers() -> None:
    """LoRA-SB: only R travels (A, B are frozen and shared); the bytes count R alone and the peers'
    A, B stay as they were."""
    from fedtune.adapters.lora_sb import SB_A, SB_B, SB_R

    ids = ("a", "b")
    g = Gossip(topology="complete", ctx=RunContext(client_ids=ids))
    m = "layer.q"
    init = {m + SB_A: torch.ones(2, 4), m + SB_B: torch.ones(4, 2), m + SB_R: torch.zeros(2, 2)}
    trained = {c: PeerState({**init, m + SB_R: torch.full((2, 2), v)}) for c, v in (("a", 2.0), ("b", 4.0))}
    mixed, per_peer, _ = exchange(g, 1, trained)
    assert sent_bytes(per_peer) == 2 * len(serialize({m + SB_R: torch.zeros(2, 2)}))
    out = mixed["a"].model()
    torch.testing.assert_close(out[m + SB_R], torch.full((2, 2), 3.0))
    torch.testing.assert_close(out[m + SB_A], init[m + SB_A])


@pytest.mark.parametrize("name", ["fp16", "quantize"])
def test_a_peer_message_decodes_as_its_codec_and_keeps_the_push_sum_weight_exact(name) -> None:
    """Under push-sum the weight travels beside the codec's body in fp64, bit for bit; the
    tensors decode exactly as the codec alone decodes them (same seeded generator)."""
    codec = make_codec(name)
    x = torch.linspace(-1.3, 0.7, 300).reshape(3, 100)
    w = torch.tensor([1.0 / 3.0], dtype=torch.float64)
    data = pack_message(codec, {KEY: x, PUSH_SUM_WEIGHT: w}, torch.Generator().manual_seed(5))
    out = unpack_message(codec, data)
    alone, _ = codec.decode(codec.encode({KEY: x}, None, torch.Generator().manual_seed(5))[0], None)
    assert out[PUSH_SUM_WEIGHT].dtype == torch.float64 and out[PUSH_SUM_WEIGHT].item() == 1.0 / 3.0
    torch.testing.assert_close(out[KEY], alone[KEY], rtol=0, atol=0)
    assert not torch.equal(out[KEY], x)  # lossy: the receiver mixes what arrived, not the sender's tensor
    assert len(data) < len(serialize({KEY: x, PUSH_SUM_WEIGHT: w}))


def test_a_gossip_round_over_fp16_counts_the_half_precision_bytes_and_mixes_the_decoded_messages() -> None:
    """Complete graph of two peers, W = [[1/2, 1/2], [1/2, 1/2]]: each peer mixes its own exact x
    with the other's message as fp16 decoded it, x_a = (0.1 x + fp16(0.3 x)) / 2; each message
    costs the fp16 payload's length."""
    ids = ("a", "b")
    g = Gossip(topology="complete", ctx=RunContext(client_ids=ids))
    trained = {"a": peer(0.1), "b": peer(0.3)}
    wire = Wire(make_codec("fp16"), seed=0)
    mixed, per_peer, _ = exchange(g, 1, trained, wire=wire)
    fp16_size = len(make_codec("fp16").encode({KEY: trained["b"].x[KEY]}, None, torch.Generator())[0])
    assert per_peer["a"] == {"bytes_up": fp16_size, "bytes_down": fp16_size}
    b_arrived = trained["b"].x[KEY].half().float()
    torch.testing.assert_close(mixed["a"].x[KEY], (trained["a"].x[KEY] + b_arrived) / 2, rtol=0, atol=0)
    assert not torch.equal(mixed["a"].x[KEY], (trained["a"].x[KEY] + trained["b"].x[KEY]) / 2)

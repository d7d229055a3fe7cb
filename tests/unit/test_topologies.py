"""Peer graphs beyond the static undirected ones: the 2-D torus's spectral gap equals its
closed form, time-varying graphs (random matchings, resampled regular graphs, epidemic fan-out)
are fresh each round and the same on every peer for a round, push-sum keeps the sum on a directed
graph and reaches the exact average, and a topology that cannot work is a named problem."""

import math

import numpy as np
import pytest
import torch

from fedtune.client.run import PeerState
from fedtune.codecs import serialize
from fedtune.recipes.decentralized import exchange
from fedtune.strategies.base import RunContext
from fedtune.strategies.decentralized import PUSH_SUM_WEIGHT, Gossip
from fedtune.topology import TopologySpec, coefficient_matrix, mixing_gap, round_graph, round_weights

KEY = "m.lora_B.weight"


def peers_at(ids, values) -> dict[str, PeerState]:
    """Peers after a local step from zero: x = [[v]], w = 1."""
    return {c: PeerState({KEY: torch.tensor([[v]])}) for c, v in zip(ids, values)}


def models(peers: dict[str, PeerState], ids) -> list[float]:
    """Each peer's de-biased model z = x / w."""
    return [peers[c].model()[KEY].item() for c in ids]


def test_torus_gap_is_the_closed_form() -> None:
    """3 x 3 torus: every degree 4, W = (I + Adj) / 5, Adj's eigenvalues 2cos(2 pi a/3) + 2cos(2 pi b/3),
    so W's are 1, 2/5 and -1/5: gap 3/5."""
    ids = [f"c{i}" for i in range(9)]
    spec = TopologySpec("torus")
    assert all(d == 4 for _, d in round_graph(spec, ids, ids, 0, 1).degree())
    m = coefficient_matrix(round_weights(spec, ids, ids, 0, 1), ids)
    np.testing.assert_allclose(m.sum(0), 1.0)
    lam = sorted(
        {
            round((1 + 2 * math.cos(2 * math.pi * a / 3) + 2 * math.cos(2 * math.pi * b / 3)) / 5, 9)
            for a in range(3)
            for b in range(3)
        }
    )
    assert lam == [-0.2, 0.4, 1.0]
    assert mixing_gap(m) == pytest.approx(3 / 5)


def test_max_degree_weights_on_a_path() -> None:
    """Path a-b-c, max degree 2: W_ij = 1/3 for every edge, a's and c's self weight 2/3."""
    ids = ["a", "b", "c"]
    spec = TopologySpec("edges", edges=(("a", "b"), ("b", "c")), mixing="max_degree")
    coef = round_weights(spec, ids, ids, 0, 1)
    assert coef == {
        "a": {"a": pytest.approx(2 / 3), "b": 1 / 3},
        "b": {"b": pytest.approx(1 / 3), "a": 1 / 3, "c": 1 / 3},
        "c": {"c": pytest.approx(2 / 3), "b": 1 / 3},
    }


def test_a_random_matching_is_fresh_every_round_and_the_same_for_every_peer() -> None:
    ids = [f"c{i}" for i in range(8)]
    spec = TopologySpec("matching")
    edges = [sorted(map(sorted, round_graph(spec, ids, ids, 0, r).edges())) for r in range(1, 4)]
    assert all(len(e) == 4 for e in edges) and edges[0] != edges[1] != edges[2]
    assert edges[0] == sorted(map(sorted, round_graph(spec, ids, ids, 0, 1).edges()))  # any peer recomputes it
    m = coefficient_matrix(round_weights(spec, ids, ids, 0, 1), ids)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(m.sum(0), 1.0)
    assert set(np.round(m[m > 0], 9)) == {0.5}
    assert mixing_gap(m) == pytest.approx(0.0, abs=1e-12)  # one round's matching is disconnected


def test_gossip_over_random_matchings_reaches_the_average() -> None:
    ids = tuple(f"c{i}" for i in range(8))
    g = Gossip(topology="matching", ctx=RunContext(client_ids=ids))
    start = [float(i * i) for i in range(8)]
    peers, _, _ = exchange(g, 1, peers_at(ids, start))
    for r in range(2, 60):
        peers, _, _ = exchange(g, r, peers)
        assert sum(models(peers, ids)) == pytest.approx(sum(start))
    assert models(peers, ids) == pytest.approx([sum(start) / 8] * 8, rel=1e-4)


def test_resampled_regular_graphs_change_every_round() -> None:
    ids = [f"c{i}" for i in range(10)]
    spec = TopologySpec("regular", degree=3, resample=True)
    g1, g2 = (sorted(map(sorted, round_graph(spec, ids, ids, 0, r).edges())) for r in (1, 2))
    assert g1 != g2 and len(g1) == len(g2) == 15
    fixed = TopologySpec("regular", degree=3)
    assert round_graph(fixed, ids, ids, 0, 1) is round_graph(fixed, ids, ids, 0, 2)  # built once


def test_push_sum_on_a_directed_ring_keeps_the_sum_and_reaches_the_average() -> None:
    """Directed ring a->b->c->d->a: each peer keeps half of (x, w) and sends half on. The matrix is
    column-stochastic (not row-stochastic after w drifts); z = x / w reaches the exact mean."""
    ids = ("a", "b", "c", "d")
    ring = (("a", "b"), ("b", "c"), ("c", "d"), ("d", "a"))
    g = Gossip(topology="edges", edges=ring, directed=True, mixing="push_sum", ctx=RunContext(client_ids=ids))
    coef = round_weights(g.spec, ids, ids, 0, 1)
    assert coef["b"] == {"a": 0.5, "b": 0.5}
    start = [1.0, 2.0, 3.0, 10.0]
    peers, per_peer, metrics = exchange(g, 1, peers_at(ids, start))
    # a message: x and w (fp64, so the weights' sum is kept in the maths' precision)
    size = len(serialize({KEY: torch.zeros(1, 1), PUSH_SUM_WEIGHT: torch.zeros(1, dtype=torch.float64)}))
    assert metrics["gossip_messages"] == 4 and sum(p["bytes_up"] for p in per_peer.values()) == 4 * size
    for r in range(2, 80):
        peers, _, _ = exchange(g, r, peers)
    x = [peers[c].x[KEY].item() for c in ids]
    assert sum(x) == pytest.approx(sum(start)) and sum(peers[c].w for c in ids) == pytest.approx(4.0)
    assert models(peers, ids) == pytest.approx([4.0] * 4, rel=1e-6)


def test_push_sum_with_unequal_weights_de_biases() -> None:
    """Directed path a->b (b sends nothing): after one round a keeps (x_a/2, 1/2), b holds
    (x_a/2 + x_b, 3/2): z_b = (x_a/2 + x_b) / (3/2), the w-weighted mean; a's z is unchanged."""
    ids = ("a", "b")
    g = Gossip(topology="edges", edges=(("a", "b"),), directed=True, mixing="push_sum", ctx=RunContext(client_ids=ids))
    peers, _, _ = exchange(g, 1, peers_at(ids, [3.0, 6.0]))
    assert {c: p.w for c, p in peers.items()} == {"a": 0.5, "b": 1.5}
    assert models(peers, ids) == pytest.approx([3.0, (1.5 + 6.0) / 1.5])
    # the next local step is applied to x (SGP: the loop's x + delta): a's x = 1.5 + 1; alone in the
    # round (b does not take part) a keeps all of (x, w): z = 2.5 / 0.5
    a = PeerState({KEY: peers["a"].x[KEY] + 1.0}, peers["a"].w)
    alone, _, metrics = exchange(g, 2, {"a": a})
    assert alone["a"].x[KEY].item() == pytest.approx(2.5) and alone["a"].model()[KEY].item() == pytest.approx(5.0)
    assert metrics["gossip_messages"] == 0


def test_epidemic_fan_out_is_directed_and_converges_with_push_sum() -> None:
    ids = tuple(f"c{i}" for i in range(10))
    spec = TopologySpec("epidemic", fanout=2, mixing="push_sum")
    graph = round_graph(spec, ids, ids, 0, 1)
    assert graph.is_directed() and all(d == 2 for _, d in graph.out_degree())
    assert sorted(graph.edges()) != sorted(round_graph(spec, ids, ids, 0, 2).edges())
    g = Gossip(topology="epidemic", fanout=2, mixing="push_sum", ctx=RunContext(client_ids=ids))
    start = [float(i) for i in range(10)]
    peers, _, _ = exchange(g, 1, peers_at(ids, start))
    for r in range(2, 40):
        peers, _, _ = exchange(g, r, peers)
    assert models(peers, ids) == pytest.approx([4.5] * 10, rel=1e-4)


@pytest.mark.parametrize(
    ("params", "field", "match"),
    [
        ({"topology": "epidemic", "fanout": 2}, "strategy.mixing", "set strategy.mixing: push_sum"),
        ({"topology": "edges", "edges": (("c0", "c1"),), "directed": True}, "strategy.mixing", "is directed"),
        ({"topology": "torus"}, "strategy.rows", "both at least 3"),
        ({"topology": "epidemic", "fanout": 7, "mixing": "push_sum"}, "strategy.fanout", "0 < fanout < 7"),
        (
            {
                "topology": "edges",
                "edges": (("c0", "c1"), ("c1", "c2"), ("c2", "c3"), ("c3", "c4"), ("c4", "c5"), ("c5", "c6")),
                "directed": True,
                "mixing": "push_sum",
            },
            "strategy.topology",
            "not strongly connected",
        ),
    ],
)
def test_a_directed_or_torus_topology_that_cannot_work_is_named(params, field, match) -> None:
    ids = [f"c{i}" for i in range(7)]
    problems = Gossip(**params).network_problems(ids, seed=0)
    assert [p.field for p in problems] == [field]
    assert match in problems[0].constraint or match in problems[0].fix


def test_edges_from_a_file(tmp_path) -> None:
    f = tmp_path / "net.txt"
    f.write_text("# my network\nc0 c1\nc1,c2\n\nc2 c0  # closes the triangle\n")
    g = Gossip(topology="edges", edges_file=str(f))
    assert g.spec.edges == (("c0", "c1"), ("c1", "c2"), ("c2", "c0"))
    assert g.network_problems(["c0", "c1", "c2"], 0) == []
    f.write_text("c0 c1 c2\n")
    (p,) = g.network_problems(["c0", "c1", "c2"], 0)
    assert p.field == "strategy.edges_file" and "line 1" in p.constraint
    (p,) = Gossip(topology="edges", edges_file=str(tmp_path / "none.txt")).network_problems(["c0"], 0)
    assert p.field == "strategy.edges_file" and "cannot be read" in p.constraint

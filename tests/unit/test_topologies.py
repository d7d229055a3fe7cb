"""Peer graphs beyond the static undirected ones: the 2-D torus's spectral gap equals its
closed form, time-varying graphs (random matchings, resampled regular graphs, epidemic fan-out)
are fresh each round and the same on every peer for a round, push-sum keeps the sum on a directed
graph and reaches the exact average, and a topology that cannot work is a named problem."""

import math

import numpy as np
import pytest
import torch

from fedtune.codecs import serialize
from fedtune.strategies.base import RunContext
from fedtune.strategies.decentralized import PUSH_SUM_WEIGHT, Gossip
from fedtune.topology import TopologySpec, coefficient_matrix, mixing_gap, round_graph, round_weights
from fedtune.types import ClientUpdate

KEY = "m.lora_B.weight"


def update(cid: str, value: float) -> ClientUpdate:
    return ClientUpdate(cid, {KEY: torch.tensor([[value]])}, 10, {}, 0, 0)


def models(g: Gossip, state, ids) -> list[float]:
    got = g.configure(0, list(ids), state)
    return [got[c][KEY].item() for c in ids]


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
    agg = g.aggregate(1, [update(c, v) for c, v in zip(ids, start)], g.init_state({KEY: torch.zeros(1, 1)}))
    for r in range(2, 60):
        agg = g.aggregate(r, [update(c, 0.0) for c in ids], agg.state)
        assert sum(models(g, agg.state, ids)) == pytest.approx(sum(start))
    assert models(g, agg.state, ids) == pytest.approx([sum(start) / 8] * 8, rel=1e-4)


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
    agg = g.aggregate(1, [update(c, v) for c, v in zip(ids, start)], g.init_state({KEY: torch.zeros(1, 1)}))
    size = len(serialize({KEY: torch.zeros(1, 1), PUSH_SUM_WEIGHT: torch.zeros(1)}))
    assert agg.metrics["gossip_messages"] == 4 and agg.bytes_up == 4 * size
    for r in range(2, 80):
        agg = g.aggregate(r, [update(c, 0.0) for c in ids], agg.state)
    x = [agg.state["clients"][c][KEY].item() for c in ids]
    assert sum(x) == pytest.approx(sum(start))
    assert models(g, agg.state, ids) == pytest.approx([4.0] * 4, rel=1e-6)


def test_push_sum_with_unequal_weights_de_biases() -> None:
    """Directed path a->b (b sends nothing): after one round a keeps (x_a/2, 1/2), b holds
    (x_a/2 + x_b, 3/2): z_b = (x_a/2 + x_b) / (3/2), the w-weighted mean; a's z is unchanged."""
    ids = ("a", "b")
    g = Gossip(topology="edges", edges=(("a", "b"),), directed=True, mixing="push_sum", ctx=RunContext(client_ids=ids))
    agg = g.aggregate(1, [update("a", 3.0), update("b", 6.0)], g.init_state({KEY: torch.zeros(1, 1)}))
    assert agg.state["weights"] == {"a": 0.5, "b": 1.5}
    assert models(g, agg.state, ids) == pytest.approx([3.0, (1.5 + 6.0) / 1.5])
    # the next local step is applied to x (SGP): a's x = 1.5 + 1
    agg = g.aggregate(2, [update("a", 1.0)], agg.state)
    assert agg.state["clients"]["a"][KEY].item() == pytest.approx(2.5)


def test_epidemic_fan_out_is_directed_and_converges_with_push_sum() -> None:
    ids = tuple(f"c{i}" for i in range(10))
    spec = TopologySpec("epidemic", fanout=2, mixing="push_sum")
    graph = round_graph(spec, ids, ids, 0, 1)
    assert graph.is_directed() and all(d == 2 for _, d in graph.out_degree())
    assert sorted(graph.edges()) != sorted(round_graph(spec, ids, ids, 0, 2).edges())
    g = Gossip(topology="epidemic", fanout=2, mixing="push_sum", ctx=RunContext(client_ids=ids))
    start = [float(i) for i in range(10)]
    agg = g.aggregate(1, [update(c, v) for c, v in zip(ids, start)], g.init_state({KEY: torch.zeros(1, 1)}))
    for r in range(2, 40):
        agg = g.aggregate(r, [update(c, 0.0) for c in ids], agg.state)
    assert models(g, agg.state, ids) == pytest.approx([4.5] * 10, rel=1e-4)


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

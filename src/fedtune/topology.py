"""Peer graphs for decentralized learning and their gossip (mixing) weights.

A topology is built over the registered client ids (in sorted order) with networkx, from a name
and its parameters, deterministically from the run seed. Its mixing weights are the
Metropolis-Hastings weights (Xiao and Boyd, "Fast linear iterations for distributed averaging",
2004): W_ij = 1 / (1 + max(d_i, d_j)) for a neighbour j, W_ii = 1 - sum_j W_ij. W is symmetric
and doubly stochastic, so repeated mixing converges to the average on a connected graph, at a
rate set by the spectral gap 1 - max(|lambda_2|, |lambda_n|).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from fedtune.errors import Problem
from fedtune.seeding import derive_seed

TOPOLOGIES = ("ring", "complete", "regular", "erdos_renyi", "edges")
SPECTRAL_GAP_MAX_PEERS = 2000  # a dense eigendecomposition beyond this is not worth a round metric


@dataclass(frozen=True)
class TopologySpec:
    """What a user writes: `kind` and the parameter it needs (`degree` for regular, `p` for
    erdos_renyi, `edges` as pairs of client ids for edges)."""

    kind: str = "ring"
    degree: int = 4
    p: float = 0.5
    edges: tuple[tuple[str, str], ...] = ()


def spec_problems(spec: TopologySpec, ids: Sequence[str], seed: int, where: str = "strategy") -> list[Problem]:
    """Everything that keeps `spec` from giving a connected graph over `ids` with the run's `seed`
    (the graph the run will use), before training."""
    n, out = len(ids), []
    if spec.kind == "regular" and not (0 < spec.degree < n and (n * spec.degree) % 2 == 0):
        out.append(
            Problem(
                f"{where}.degree",
                spec.degree,
                f"a random regular graph on {n} peers needs 0 < degree < {n} and peers x degree even",
                f"use an even degree below {n}" if n % 2 else f"use a degree between 1 and {n - 1}",
            )
        )
        return out
    if spec.kind == "erdos_renyi" and not 0.0 < spec.p <= 1.0:
        return [Problem(f"{where}.p", spec.p, "an edge probability must be in (0, 1]", "use e.g. strategy.p: 0.5")]
    if spec.kind == "edges":
        known = set(ids)
        unknown = sorted({c for e in spec.edges for c in e if c not in known})
        if unknown:
            return [
                Problem(
                    f"{where}.edges",
                    unknown,
                    f"names clients that do not exist (the clients are {', '.join(ids)})",
                    "give pairs of these client ids",
                )
            ]
        loops = [list(e) for e in spec.edges if e[0] == e[1]]
        if loops:
            return [Problem(f"{where}.edges", loops, "an edge from a client to itself", "drop these pairs")]
    if n >= 2:
        graph = build_graph(spec, ids, seed)
        parts = [sorted(c) for c in nx.connected_components(graph)]
        if len(parts) > 1:
            shown = "; ".join(", ".join(p[:5]) + (" ..." if len(p) > 5 else "") for p in parts[:4])
            out.append(
                Problem(
                    f"{where}.topology",
                    spec.kind,
                    f"the peer graph is disconnected ({len(parts)} parts: {shown}): their models never meet",
                    "add edges between the parts, raise strategy.p (or try another seed), or use topology: ring",
                )
            )
    return out


def build_graph(spec: TopologySpec, ids: Sequence[str], seed: int) -> nx.Graph:
    """The peer graph over `ids` (sorted; a random graph is drawn from the run seed)."""
    ids = sorted(ids)
    n = len(ids)
    rs = derive_seed(seed, "topology", spec.kind) % (2**32)
    if spec.kind == "ring":
        g = nx.cycle_graph(n) if n >= 3 else nx.path_graph(n)
    elif spec.kind == "complete":
        g = nx.complete_graph(n)
    elif spec.kind == "regular":
        g = nx.random_regular_graph(spec.degree, n, seed=rs)
    elif spec.kind == "erdos_renyi":
        g = nx.gnp_random_graph(n, spec.p, seed=rs)
    elif spec.kind == "edges":
        g = nx.Graph()
        g.add_nodes_from(ids)
        g.add_edges_from(spec.edges)
        return g
    else:
        raise ValueError(f"unknown topology {spec.kind!r} (known: {', '.join(TOPOLOGIES)})")
    return nx.relabel_nodes(g, dict(enumerate(ids)))


def metropolis_weights(graph: nx.Graph) -> dict[str, dict[str, float]]:
    """{i: {j: W_ij}} for every neighbour j of i (the self weight is 1 - the row's sum)."""
    deg = dict(graph.degree())
    return {i: {j: 1.0 / (1.0 + max(deg[i], deg[j])) for j in sorted(graph.neighbors(i))} for i in graph.nodes}


def mixing_matrix(weights: Mapping[str, Mapping[str, float]], ids: Sequence[str]) -> np.ndarray:
    """The dense W over `ids` (rows and columns in that order)."""
    pos = {c: k for k, c in enumerate(ids)}
    w = np.zeros((len(ids), len(ids)))
    for i, row in weights.items():
        for j, v in row.items():
            w[pos[i], pos[j]] = v
        w[pos[i], pos[i]] = 1.0 - sum(row.values())
    return w


def spectral_gap(w: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric mixing matrix (1: one step averages)."""
    if w.shape[0] < 2:
        return 1.0
    lam = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(1.0 - lam[1])

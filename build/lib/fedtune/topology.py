"""Peer graphs for decentralized learning and their gossip (mixing) weights.

A topology is built over the registered client ids (in sorted order) with networkx, from a name
and its parameters, deterministically from the run seed. Its mixing weights are the
Metropolis-Hastings weights (Xiao and Boyd, "Fast linear iterations for distributed averaging",
2004): W_ij = 1 / (1 + max(d_i, d_j)) for a neighbour j, W_ii = 1 - sum_j W_ij. W is symmetric
and doubly stochastic, so repeated mixing converges to the average on a connected graph, at a
rate set by the spectral gap 1 - max(|lambda_2|, |lambda_n|).

Time-varying graphs are drawn afresh every round from (seed, round): `matching` (a random
matching of the round's peers; each pair averages), `regular` / `erdos_renyi` with `resample`,
and `epidemic` (Epidemic-Learning style, de Vos et al., arXiv:2310.01972: every peer sends to
`fanout` peers drawn at random; a directed graph). Directed graphs (`epidemic`, `edges` with
`directed`) mix by push-sum (Kempe, Dobra and Gehrke 2003; as SGP, Assran et al. 2019): a peer
splits its (x, w) evenly over itself and its out-neighbours, so each column of the round's matrix
sums to 1 and the sums of x and of w are kept; the de-biased model is z = x / w.
`round_weights` gives the round's matrix over the peers that took part, whatever the graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import networkx as nx
import numpy as np

from fedtune.errors import Problem
from fedtune.seeding import derive_seed

TOPOLOGIES = ("ring", "complete", "regular", "erdos_renyi", "edges", "torus", "matching", "epidemic")
MIXINGS = ("metropolis", "max_degree", "push_sum")
SPECTRAL_GAP_MAX_PEERS = 2000  # a dense eigendecomposition beyond this is not worth a round metric


@dataclass(frozen=True)
class TopologySpec:
    """What a user writes: `kind` and the parameter it needs (`degree` for regular, `p` for
    erdos_renyi, `edges` as pairs of client ids for edges (`directed`: a -> b only), `rows` for
    torus (default: the most square rows x columns), `fanout` for epidemic), `resample` (a fresh
    regular / erdos_renyi graph every round) and `mixing`."""

    kind: str = "ring"
    degree: int = 4
    p: float = 0.5
    edges: tuple[tuple[str, str], ...] = ()
    directed: bool = False
    rows: int | None = None
    fanout: int = 1
    resample: bool = False
    mixing: str = "metropolis"

    @property
    def is_directed(self) -> bool:
        return self.kind == "epidemic" or (self.kind == "edges" and self.directed)

    @property
    def time_varying(self) -> bool:
        return self.kind in ("matching", "epidemic") or (self.resample and self.kind in ("regular", "erdos_renyi"))


def read_edges(path: str) -> tuple[tuple[str, str], ...]:
    """Pairs of client ids from a text file: one `a b` (or `a,b`) per line; `#` starts a comment.
    Raises ValueError naming the file and the line that is not a pair."""
    out = []
    for n, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        text = line.split("#", 1)[0].replace(",", " ").split()
        if not text:
            continue
        if len(text) != 2:
            raise ValueError(f"{path}, line {n}: {line.strip()!r} is not a pair of client ids (write `a b`)")
        out.append((text[0], text[1]))
    return tuple(out)


def torus_rows(n: int, rows: int | None) -> int:
    """Rows of the 2-D torus on n peers: as given, else the largest divisor of n up to sqrt(n)."""
    if rows is not None:
        return rows
    return max(r for r in range(1, int(n**0.5) + 1) if n % r == 0)


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
    if spec.mixing not in MIXINGS:
        return [Problem(f"{where}.mixing", spec.mixing, f"unknown mixing (known: {', '.join(MIXINGS)})", "")]
    if spec.is_directed and spec.mixing != "push_sum":
        return [
            Problem(
                f"{where}.mixing",
                spec.mixing,
                f"topology {spec.kind!r} is directed: symmetric weights cannot be built on it (the peers' "
                "average would drift)",
                f"set {where}.mixing: push_sum",
            )
        ]
    if spec.kind == "torus":
        r = torus_rows(n, spec.rows)
        if r < 3 or n % r or n // r < 3:
            return [
                Problem(
                    f"{where}.rows",
                    spec.rows,
                    f"a 2-D torus on {n} peers needs rows x columns = {n} with both at least 3 (rows {r})",
                    "give rows dividing the number of clients, e.g. 9 clients: rows 3, or use topology: ring",
                )
            ]
    if spec.kind == "epidemic" and not 0 < spec.fanout < max(n, 2):
        return [
            Problem(
                f"{where}.fanout",
                spec.fanout,
                f"each peer sends to fanout other peers: needs 0 < fanout < {n}",
                "use e.g. fanout: 2",
            )
        ]
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
    if spec.kind == "matching" or spec.kind == "epidemic" or spec.time_varying:
        return out  # a fresh graph every round: mixing over rounds, not one connected graph
    if n >= 2:
        graph = build_graph(spec, ids, seed)
        parts = [
            sorted(c)
            for c in (
                nx.strongly_connected_components(graph) if graph.is_directed() else nx.connected_components(graph)
            )
        ]
        if len(parts) > 1:
            shown = "; ".join(", ".join(p[:5]) + (" ..." if len(p) > 5 else "") for p in parts[:4])
            out.append(
                Problem(
                    f"{where}.topology",
                    spec.kind,
                    f"the peer graph is {'not strongly connected' if graph.is_directed() else 'disconnected'} "
                    f"({len(parts)} parts: {shown}): their models never meet",
                    "add edges between the parts, raise strategy.p (or try another seed), or use topology: ring",
                )
            )
    return out


def build_graph(spec: TopologySpec, ids: Sequence[str], seed: int, rnd: int = 0) -> nx.Graph:
    """The peer graph over `ids` (sorted; a random graph is drawn from the run seed, and for a
    time-varying topology from the round `rnd` too). `matching` and `epidemic` graphs are drawn
    over the peers given (the round's)."""
    ids = sorted(ids)
    n = len(ids)
    rs = derive_seed(seed, "topology", spec.kind, *([rnd] if spec.time_varying else [])) % (2**32)
    if spec.kind == "matching":
        order = np.random.default_rng(rs).permutation(n)
        g = nx.Graph()
        g.add_nodes_from(range(n))
        g.add_edges_from((int(order[k]), int(order[k + 1])) for k in range(0, n - 1, 2))
    elif spec.kind == "epidemic":
        rng = np.random.default_rng(rs)
        g = nx.DiGraph()
        g.add_nodes_from(range(n))
        for i in range(n):
            others = [j for j in range(n) if j != i]
            g.add_edges_from((i, int(j)) for j in rng.choice(others, size=min(spec.fanout, len(others)), replace=False))
    elif spec.kind == "torus":
        r = torus_rows(n, spec.rows)
        g = nx.convert_node_labels_to_integers(nx.grid_2d_graph(r, n // r, periodic=True), ordering="sorted")
    elif spec.kind == "ring":
        g = nx.cycle_graph(n) if n >= 3 else nx.path_graph(n)
    elif spec.kind == "complete":
        g = nx.complete_graph(n)
    elif spec.kind == "regular":
        g = nx.random_regular_graph(spec.degree, n, seed=rs)
    elif spec.kind == "erdos_renyi":
        g = nx.gnp_random_graph(n, spec.p, seed=rs)
    elif spec.kind == "edges":
        g = nx.DiGraph() if spec.directed else nx.Graph()
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
    w = coefficient_matrix(weights, ids)
    for i, row in weights.items():
        w[pos[i], pos[i]] = 1.0 - sum(row.values())
    return w


def spectral_gap(w: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric mixing matrix (1: one step averages)."""
    if w.shape[0] < 2:
        return 1.0
    lam = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(1.0 - lam[1])


@lru_cache(maxsize=8)
def _static(spec: TopologySpec, ids: tuple[str, ...], seed: int) -> nx.Graph:
    return build_graph(spec, ids, seed)


def round_graph(spec: TopologySpec, ids: Sequence[str], live: Sequence[str], seed: int, rnd: int) -> nx.Graph:
    """The graph of round `rnd`: the static graph over all registered `ids` (built once), a fresh
    one over them (`resample`), or a fresh one over the round's `live` peers (matching, epidemic)."""
    if spec.kind in ("matching", "epidemic"):
        return build_graph(spec, sorted(live), seed, rnd)
    if spec.time_varying:
        return build_graph(spec, ids, seed, rnd)
    return _static(spec, tuple(sorted(ids)), seed)


def round_weights(
    spec: TopologySpec, ids: Sequence[str], live: Sequence[str], seed: int, rnd: int
) -> dict[str, dict[str, float]]:
    """{receiver j: {sender i: coefficient}} over the round's `live` peers, self included: the
    new x_j = sum_i coef[j][i] x_i. Symmetric mixings are computed on the round's graph over all
    its peers (an absent neighbour's weight stays on the diagonal), so the matrix over the live
    peers is symmetric and doubly stochastic; push-sum's is column-stochastic over the edges
    between live peers (a sender splits evenly over itself and its live out-neighbours)."""
    graph, here = round_graph(spec, ids, live, seed, rnd), set(live)
    out: dict[str, dict[str, float]] = {j: {} for j in sorted(here)}
    if spec.mixing == "push_sum":
        for i in sorted(here):
            targets = (
                [j for j in graph.successors(i) if j in here]
                if graph.is_directed()
                else [j for j in graph.neighbors(i) if j in here]
            )
            share = 1.0 / (1 + len(targets))
            for j in [i, *targets]:
                out[j][i] = out[j].get(i, 0.0) + share
        return out
    full = _symmetric(spec, graph) if spec.kind != "matching" and not spec.time_varying else _weights(spec, graph)
    for j in sorted(here):
        row = {i: w for i, w in full.get(j, {}).items() if i in here}
        out[j] = {j: 1.0 - sum(row.values()), **row}
    return out


def _weights(spec: TopologySpec, graph: nx.Graph) -> dict[str, dict[str, float]]:
    if spec.mixing == "max_degree":
        top = max((d for _, d in graph.degree()), default=0)
        return {i: dict.fromkeys(sorted(graph.neighbors(i)), 1.0 / (1.0 + top)) for i in graph.nodes}
    return metropolis_weights(graph)


@lru_cache(maxsize=8)
def _symmetric(spec: TopologySpec, graph: nx.Graph) -> dict[str, dict[str, float]]:
    """A static graph's weights, built once per run (the graph is the cached `_static` one)."""
    return _weights(spec, graph)


def coefficient_matrix(coef: Mapping[str, Mapping[str, float]], ids: Sequence[str]) -> np.ndarray:
    """The dense matrix M[j, i] = coef[j][i] over `ids`."""
    pos = {c: k for k, c in enumerate(ids)}
    m = np.zeros((len(ids), len(ids)))
    for j, row in coef.items():
        for i, v in row.items():
            m[pos[j], pos[i]] = v
    return m


def mixing_gap(m: np.ndarray) -> float:
    """1 - the second largest |eigenvalue| of a mixing matrix, symmetric or not (push-sum's
    column-stochastic one); 0 when the round's graph is disconnected."""
    if m.shape[0] < 2:
        return 1.0
    if np.allclose(m, m.T):
        return spectral_gap(m)
    lam = np.sort(np.abs(np.linalg.eigvals(m)))[::-1]
    return float(max(0.0, 1.0 - lam[1]))

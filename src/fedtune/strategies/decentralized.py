"""Decentralized learning without a server: every peer keeps its own adapter and averages it
with its neighbours' over a peer graph after local training.

`gossip` is decentralized FedAvg (DFedAvg of Sun, Li and Wang, "Decentralized Federated
Averaging", arXiv:2104.11375, without DFedAvgM's momentum: the local steps use fedtune's
optimizer) in its train-then-mix ("adapt then combine") form: a peer trains from its own adapter,
then x_i <- W_ii x_i + sum_{j in N(i)} W_ij x_j with Metropolis-Hastings weights
(`fedtune.topology`). With one local SGD step this is the adapt-then-combine variant of D-PSGD
(Lian et al. 2017), whose original form mixes the pre-step models and adds the local gradient;
that mix-then-train form is not offered. A round's messages are the trained adapters of the peers that took part
(sampled and replied) to their neighbours that took part too; an edge to a peer that did not
take part carries nothing and its weight stays on the diagonal, so W restricted to the round's
peers is still symmetric and doubly stochastic and their average is kept exactly.

A message is what a peer trains (`trainable_keys`: LoRA-SB's frozen shared A and B never travel,
only R), and LoRA factors are mixed separately, as FedIT averages them: `agg_error` is the largest
relative error, over the mixing peers, between sum_j W_ij B_j A_j and the mixed B times the mixed
A (`strategies.lora_math`; 0 where the messages hold no A, B pair, e.g. LoRA-SB's R, for which
mixing is exact).

The in-process engine simulates the peer network in one process: the loop relays the states,
which cost nothing on the wire (`transmits=False`), and the strategy counts the peer-to-peer
messages it mixes (each message once, as sent: `bytes_up`; per peer, sent and received).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from fedtune.codecs import serialize
from fedtune.errors import Problem
from fedtune.models.adapters import trainable_keys
from fedtune.strategies.base import STRATEGIES, Aggregate, Capabilities, PeerScoring, weighted_mean
from fedtune.strategies.lora_math import covariance_error, lora_modules, mean_of_products, relative_error
from fedtune.strategies.personal import PerClient
from fedtune.topology import (
    SPECTRAL_GAP_MAX_PEERS,
    TopologySpec,
    build_graph,
    metropolis_weights,
    mixing_matrix,
    spec_problems,
    spectral_gap,
)
from fedtune.types import AdapterState, ClientUpdate


def peer_codec_problems(name: str, codecs: dict[str, str]) -> list[Problem]:
    """The first non-identity codec (field -> name): peer messages are whole fp32 adapters."""
    for where, codec in codecs.items():
        if codec != "identity":
            why = (
                f"strategy {name!r} sends whole adapters between peers, and compressing peer messages is not "
                "implemented: the codec would change only the simulation's relay, not what is counted"
            )
            return [Problem(where, codec, why, "use codec: identity (and no downlink_codec)")]
    return []


@lru_cache(maxsize=8)
def _mixing(spec: TopologySpec, ids: tuple[str, ...], seed: int) -> tuple[dict[str, dict[str, float]], float | None]:
    """(Metropolis-Hastings weights, spectral gap or None for very large graphs), built once per run."""
    weights = metropolis_weights(build_graph(spec, ids, seed))
    gap = spectral_gap(mixing_matrix(weights, ids)) if len(ids) <= SPECTRAL_GAP_MAX_PEERS else None
    return weights, gap


def consensus_distance(states: Sequence[AdapterState]) -> float:
    """sqrt(mean_i ||x_i - x_bar||^2) over all tensors: how far the peers are from agreeing.
    One tensor key at a time (fp64, mean then squared deviations), never all peers stacked."""
    if len(states) < 2:
        return 0.0
    total = 0.0
    for key in states[0]:
        mean = sum(s[key].double() for s in states) / len(states)
        total += sum(float((s[key].double() - mean).pow(2).sum()) for s in states)
    return float((total / len(states)) ** 0.5)


def mixing_error(states: Sequence[AdapterState], weights: Sequence[float]) -> float:
    """Relative error of mixing LoRA factors separately: ||sum_j w_j B_j A_j - B_mix A_mix|| /
    ||sum_j w_j B_j A_j|| over all modules (0 without A, B pairs)."""
    if not lora_modules(states[0]):
        return 0.0
    exact = mean_of_products(states, weights)
    return relative_error(exact, {m: exact[m] - e for m, e in covariance_error(states, weights).items()})


@STRATEGIES.register("gossip")
@dataclass(frozen=True)
class Gossip(PerClient):
    """Decentralized FedAvg over a peer graph (no server; each peer ends with its own model).
    topology: ring | complete | regular (`degree`) | erdos_renyi (`p`) | edges (pairs of client
    ids). Round metrics: `consensus_distance` of the round's peers' adapters after mixing,
    `agg_error` (the factor-mixing error, module docstring), `spectral_gap` of the round's
    effective mixing matrix (W over the peers that took part; an absent neighbour's weight on the
    diagonal), `graph_spectral_gap` of the whole graph's W, `gossip_messages`."""

    topology: Literal["ring", "complete", "regular", "erdos_renyi", "edges"] = "ring"
    degree: int = 4
    p: float = 0.5
    edges: tuple[tuple[str, str], ...] = ()

    capabilities = Capabilities(has_global=False, personalized=True, transmits=False, peer_to_peer=True)

    @property
    def spec(self) -> TopologySpec:
        return TopologySpec(self.topology, self.degree, self.p, tuple(tuple(e) for e in self.edges))  # type: ignore[misc]

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Problem]:
        return spec_problems(self.spec, sorted(client_ids), seed)

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        clients = self.trained(rnd, updates, state)
        ids = tuple(sorted(self.ctx.client_ids))
        weights, gap = _mixing(self.spec, ids, self.ctx.seed)
        here = {u.client_id for u in updates}
        sent = {c: {k: clients[c][k] for k in trainable_keys(clients[c])} for c in here}  # the messages
        size = {c: len(serialize(sent[c])) for c in here}
        mixed = dict(clients)
        per_peer: dict[str, dict[str, int]] = {}
        messages = sent_total = 0
        error = 0.0
        for i in sorted(here):
            nbrs = [j for j in weights[i] if j in here]
            w = [1.0 - sum(weights[i][j] for j in nbrs), *(weights[i][j] for j in nbrs)]
            group = [sent[i]] + [sent[j] for j in nbrs]
            mixed[i] = {**clients[i], **weighted_mean(group, w)}
            error = max(error, mixing_error(group, w)) if nbrs else error
            per_peer[i] = {"bytes_up": size[i] * len(nbrs), "bytes_down": sum(size[j] for j in nbrs)}
            messages += len(nbrs)
            sent_total += size[i] * len(nbrs)
        live = sorted(here)
        metrics: dict[str, Any] = {
            "consensus_distance": consensus_distance([mixed[c] for c in live]),
            "agg_error": error,
            "gossip_messages": messages,
        }
        if gap is not None:  # the whole graph's, and the round's: W restricted to the peers that took part
            metrics["graph_spectral_gap"] = gap
            metrics["spectral_gap"] = spectral_gap(
                mixing_matrix({i: {j: w for j, w in weights[i].items() if j in here} for i in live}, live)
            )
        new = {**state, "clients": mixed}
        return Aggregate(state["init"], new, metrics, bytes_up=sent_total, per_client=per_peer)

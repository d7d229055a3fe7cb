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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch

from fedtune.codecs import serialize
from fedtune.errors import Problem
from fedtune.models.adapters import trainable_keys
from fedtune.strategies.base import STRATEGIES, Aggregate, Capabilities, PeerScoring, weighted_mean
from fedtune.strategies.lora_math import covariance_error, lora_modules, mean_of_products, relative_error
from fedtune.strategies.personal import PerClient
from fedtune.topology import (
    SPECTRAL_GAP_MAX_PEERS,
    TopologySpec,
    coefficient_matrix,
    mixing_gap,
    read_edges,
    round_weights,
    spec_problems,
)
from fedtune.types import AdapterState, ClientUpdate, add_states

PUSH_SUM_WEIGHT = "push_sum_weight"  # the scalar w's share that travels with a push-sum message


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
def _graph_gap(spec: TopologySpec, ids: tuple[str, ...], seed: int) -> float | None:
    """The whole static graph's spectral gap (None for a time-varying or very large graph)."""
    if spec.time_varying or len(ids) > SPECTRAL_GAP_MAX_PEERS:
        return None
    return mixing_gap(coefficient_matrix(round_weights(spec, ids, ids, seed, 0), ids))


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
    topology: ring | complete | regular (`degree`; `resample`: a fresh one each round) |
    erdos_renyi (`p`; `resample`) | torus (`rows`) | edges (pairs of client ids, or `edges_file`;
    `directed`) | matching (a fresh random matching of the round's peers) | epidemic (each peer
    sends to `fanout` random peers a round). mixing: metropolis (default) | max_degree | push_sum
    (needed by the directed ones; the state keeps each peer's push-sum weight w, a peer trains and
    exports z = x / w, and a message carries x / (out-degree + 1) and w's share).
    Round metrics: `consensus_distance` of the round's peers' models after mixing, `agg_error`
    (the factor-mixing error, module docstring), `spectral_gap` of the round's effective mixing
    matrix over the peers that took part (an absent neighbour's weight on the diagonal),
    `graph_spectral_gap` of a static graph's whole matrix, `gossip_messages`."""

    topology: Literal["ring", "complete", "regular", "erdos_renyi", "edges", "torus", "matching", "epidemic"] = "ring"
    degree: int = 4
    p: float = 0.5
    edges: tuple[tuple[str, str], ...] = ()
    edges_file: str | None = None
    directed: bool = False
    rows: int | None = None
    fanout: int = 1
    resample: bool = False
    mixing: Literal["metropolis", "max_degree", "push_sum"] = "metropolis"

    capabilities = Capabilities(has_global=False, personalized=True, transmits=False, peer_to_peer=True)

    @property
    def spec(self) -> TopologySpec:
        edges = read_edges(self.edges_file) if self.edges_file else tuple(tuple(e) for e in self.edges)
        return TopologySpec(
            self.topology,
            self.degree,
            self.p,
            edges,  # type: ignore[arg-type]
            self.directed,
            self.rows,
            self.fanout,
            self.resample,
            self.mixing,
        )

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Problem]:
        if self.edges_file:
            try:
                read_edges(self.edges_file)
            except (OSError, ValueError) as e:
                why = str(e) if isinstance(e, ValueError) else f"cannot be read ({e.strerror})"
                return [Problem("strategy.edges_file", self.edges_file, why, "give a file of `a b` lines")]
        return spec_problems(self.spec, sorted(client_ids), seed)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {**super().init_state(global_state), "weights": {}}  # push-sum weights w (absent: 1)

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        """Each peer's model: its x, de-biased by its push-sum weight (z = x / w; w = 1 otherwise)."""
        w = state.get("weights", {})
        out = {}
        for c in client_ids:
            x = state["clients"].get(c, state["init"])
            out[c] = x if w.get(c, 1.0) == 1.0 else {k: v / w[c] for k, v in x.items()}
        return out

    def trained(self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any]) -> dict[str, AdapterState]:
        """x_i + delta_i: the local step is applied to x itself (SGP's x <- x - lr g(z)); with w = 1
        this is the trained model."""
        clients = dict(state["clients"])
        for u in updates:
            clients[u.client_id] = add_states(clients.get(u.client_id, state["init"]), u.delta)
        return clients

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        clients = self.trained(rnd, updates, state)
        ids, spec = tuple(sorted(self.ctx.client_ids)), self.spec
        live = sorted({u.client_id for u in updates})
        coef = round_weights(spec, ids, live, self.ctx.seed, rnd)
        w = dict(state.get("weights", {}))
        push = spec.mixing == "push_sum"
        sent = {c: {k: clients[c][k] for k in trainable_keys(clients[c])} for c in live}  # the messages
        extra = {PUSH_SUM_WEIGHT: torch.zeros(1)} if push else {}
        size = {c: len(serialize({**sent[c], **extra})) for c in live}
        per_peer = {c: {"bytes_up": 0, "bytes_down": 0} for c in live}
        mixed, new_w, messages, error = dict(clients), dict(w), 0, 0.0
        for j in live:
            senders = sorted(coef[j])
            c = [coef[j][i] for i in senders]
            mixed[j] = {**clients[j], **weighted_mean([sent[i] for i in senders], c)}
            if push:
                new_w[j] = sum(ci * w.get(i, 1.0) for ci, i in zip(c, senders))
                z = [ci * w.get(i, 1.0) / new_w[j] for ci, i in zip(c, senders)]  # z_j's convex weights
                states = [{k: v / w.get(i, 1.0) for k, v in sent[i].items()} for i in senders]
            else:
                z, states = c, [sent[i] for i in senders]
            error = max(error, mixing_error(states, z)) if len(senders) > 1 else error
            for i in senders:
                if i != j:
                    per_peer[i]["bytes_up"] += size[i]
                    per_peer[j]["bytes_down"] += size[i]
                    messages += 1
        new = {**state, "clients": mixed, "weights": {c: v for c, v in new_w.items() if v != 1.0}}
        models = self.configure(rnd + 1, live, new)
        metrics: dict[str, Any] = {
            "consensus_distance": consensus_distance([models[c] for c in live]),
            "agg_error": error,
            "gossip_messages": messages,
        }
        if len(ids) <= SPECTRAL_GAP_MAX_PEERS:  # the round's matrix over the peers that took part
            metrics["spectral_gap"] = mixing_gap(coefficient_matrix(coef, live))
            gap = _graph_gap(spec, ids, self.ctx.seed)
            if gap is not None:
                metrics["graph_spectral_gap"] = gap
        sent_total = sum(p["bytes_up"] for p in per_peer.values())
        return Aggregate(state["init"], new, metrics, bytes_up=sent_total, per_client=per_peer)

"""Decentralized learning without a server: every peer keeps its own adapter (in its
`ClientState`: `client.run.PeerState`) and averages it with its neighbours' over a peer graph after
local training. `recipes/decentralized.py` drives the rounds; this module is the peers' maths.

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

A peer's round: the round's sampler (`peer_sampling.HashSampler`, computed by every peer alike)
says whether it takes part; if so it trains its model z = x / w with the client step
(`run_client`), applies the step to x (x <- x + delta, as SGP), sends `message(x, w)` to its
out-neighbours among the round's live peers and mixes its inbox with its own row of the round's
coefficients (`coefficients`, from `fedtune.topology.round_weights`). A message travels encoded
by `codec` (stateless: identity, fp16, quantize; `pack_message`), one encoding per sender and round
for all its receivers, who mix the decoded tensors; bytes are the lengths of the encoded messages,
each counted once as sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol, cast

import torch

from fedtune.client.run import PeerState
from fedtune.codecs.base import Codec, deserialize, header_metadata, serialize
from fedtune.errors import FedtuneError, Problem
from fedtune.models.adapters import trainable_keys
from fedtune.peer_sampling import HashSampler, PeerSampler, Roles
from fedtune.strategies.base import STRATEGIES, Capabilities, StrategyBase, StrategyCore, weighted_mean
from fedtune.strategies.lora_math import covariance_error, lora_modules, mean_of_products, relative_error
from fedtune.strategies.params import Count, Probability
from fedtune.topology import (
    SPECTRAL_GAP_MAX_PEERS,
    TopologySpec,
    coefficient_matrix,
    mixing_gap,
    read_edges,
    round_graph,
    round_weights,
    spec_problems,
)
from fedtune.types import AdapterState

PUSH_SUM_WEIGHT = "push_sum_weight"  # the push-sum weight w that travels with a message (fp64, shape [1])


def peer_codec_problems(
    name: str, codec: str, stateful: bool, downlink: str | None, client_codecs: Sequence[str] = ()
) -> list[Problem]:
    """What a peer strategy cannot do with codecs: `codec` encodes every peer message (a stateless
    one: one encoding per sender and round goes to all its receivers, so error feedback or lazy
    uploads, whose state belongs to one link, are refused), and a peer has no downlink nor a
    server-chosen codec per client."""
    out = []
    if stateful:
        why = (
            f"strategy {name!r} encodes each peer message once for all its receivers; a stateful codec (error "
            "feedback, lazy uploads) keeps one state per link, which peer messages do not have"
        )
        out.append(Problem("codec", codec, why, "use a stateless codec on peer messages: identity, fp16 or quantize"))
    if downlink is not None:
        why = f"strategy {name!r} has no server, so no downlink: every peer message is encoded with `codec`"
        out.append(Problem("downlink_codec", downlink, why, "drop downlink_codec (set codec for peer messages)"))
    if client_codecs:
        why = f"strategy {name!r} encodes every peer's messages with `codec` (a receiver decodes them alike)"
        out.append(Problem("client_codecs", sorted(client_codecs), why, "drop client_codecs"))
    return out


def is_identity(codec: Codec) -> bool:
    """A chain of identity stages only: its peer messages are the plain serialized tensors."""
    return all(type(s).__name__ == "Identity" for s in codec.stages)


PEER_MESSAGE_META = "fedtune.peer_message"  # header of a message whose push-sum weight travels beside the body


def pack_message(codec: Codec, msg: AdapterState, rng: torch.Generator) -> bytes:
    """A peer message's bytes: with the identity codec the serialized tensors (as before codecs
    applied here); else the codec's payload of the tensors, and under push-sum that payload as a
    uint8 `body` beside the weight w in fp64 (a weight is never compressed: the sum of the
    weights must stay exact)."""
    if is_identity(codec):
        return serialize(msg)
    tensors = {k: v for k, v in msg.items() if k != PUSH_SUM_WEIGHT}
    body: bytes = codec.encode(tensors, None, rng)[0]
    if PUSH_SUM_WEIGHT not in msg:
        return body
    wrapped = {"body": torch.frombuffer(bytearray(body), dtype=torch.uint8), PUSH_SUM_WEIGHT: msg[PUSH_SUM_WEIGHT]}
    return serialize(wrapped, {PEER_MESSAGE_META: "push-sum"})


def unpack_message(codec: Codec, data: bytes) -> AdapterState:
    """The tensors a receiver mixes, from `pack_message`'s bytes."""
    if is_identity(codec):
        return deserialize(data)
    if header_metadata(data).get(PEER_MESSAGE_META) == "push-sum":
        outer = deserialize(data)
        inner: AdapterState = codec.decode(outer["body"].numpy().tobytes(), None)[0]
        return {**inner, PUSH_SUM_WEIGHT: outer[PUSH_SUM_WEIGHT]}
    tensors: AdapterState = codec.decode(data, None)[0]
    return tensors


def peer_problems(name: str, codecs: list[Problem], randomness: str) -> list[Problem]:
    """A peer strategy's config problems: its codec problems (`peer_codec_problems`), and
    `privacy.randomness: secure`, which asks for a secret round sample that a sample every peer
    computes from the seed cannot be."""
    out = list(codecs)
    if randomness == "secure":
        why = (
            f"strategy {name!r} has no server to draw a secret sample: each round's peers are a seeded hash "
            "that every peer computes (public to anyone holding the config)"
        )
        out.append(Problem("privacy.randomness", randomness, why, "use privacy.randomness: seeded (or auto)"))
    return out


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


class PeerStrategy(StrategyCore, Protocol):
    """What a decentralized strategy (`capabilities.peer_to_peer`) gives the serverless loop
    (`recipes/decentralized.py`); every method is a peer's own computation from public facts."""

    def sampler(self, fraction: float, min_peers: int, scheme: str) -> PeerSampler:
        """Who trains and who mixes in a round (every peer computes it alike)."""
        ...

    def sources(self, rnd: int, trainers: Sequence[str], previous: Roles | None) -> dict[str, str]:
        """{trainer: the peer whose model it starts from} (itself, or e.g. an aggregator of the
        previous round's `previous` roles)."""
        ...

    def coefficients(self, rnd: int, live: Sequence[str], roles: Roles) -> dict[str, dict[str, float]]:
        """{receiver: {sender: c}}: who mixes what after the `live` trainers trained."""
        ...

    def message(self, peer: PeerState) -> AdapterState:
        """What a peer sends (its trainable tensors, and what its mixing needs)."""
        ...

    def adopt(self, own: PeerState, message: AdapterState) -> PeerState:
        """A peer's state after taking a received model as its own."""
        ...

    def to_score(self, rnd: int, me: str, own: PeerState, inbox: Mapping[str, AdapterState]) -> dict[str, AdapterState]:
        """The models peer `me` scores on its own data before mixing ({name: model}; {}: none)."""
        ...

    def mix(
        self,
        me: str,
        own: PeerState,
        inbox: Mapping[str, AdapterState],
        coef: Mapping[str, float],
        losses: Mapping[str, float] | None = None,
    ) -> tuple[PeerState, float]:
        """Peer `me`'s local mix of its inbox with its row of coefficients (and the `losses` on its
        own data of the models it asked to score), and the factor error."""
        ...

    def round_metrics(
        self, coef: Mapping[str, Mapping[str, float]], models: Mapping[str, AdapterState]
    ) -> dict[str, Any]:
        """The round's metrics from its coefficients and the receivers' models after mixing."""
        ...


def as_peer_strategy(strategy: StrategyCore, name: str) -> PeerStrategy:
    """`strategy` as the serverless loop sees it: its declared `capabilities.peer_to_peer` says it
    has PeerStrategy's methods (the registry's contract); `name` is the configured strategy.name."""
    if not strategy.capabilities.peer_to_peer:
        raise FedtuneError(
            f"strategy.name {name!r} aggregates on a server; a peer runs serverless strategies "
            "only: use strategy.name: gossip (or modest)"
        )
    return cast(PeerStrategy, strategy)


def adopt_model(own: PeerState, message: AdapterState) -> PeerState:
    """`own` with the message's tensors as its x (frozen keys that never travel are kept) and w = 1."""
    return PeerState({**own.x, **{k: v for k, v in message.items() if k != PUSH_SUM_WEIGHT}})


def peer_message(peer: PeerState, push_sum: bool) -> AdapterState:
    """What a peer sends its out-neighbours: the trainable tensors of its x (LoRA-SB's frozen,
    shared A and B never travel) and, under push-sum, its weight w (fp64, so the sum of the
    weights is kept exactly as in the maths)."""
    msg = {k: peer.x[k] for k in trainable_keys(peer.x)}
    return {**msg, PUSH_SUM_WEIGHT: torch.tensor([peer.w], dtype=torch.float64)} if push_sum else msg


def mix_inbox(
    own: PeerState, own_message: AdapterState, inbox: Mapping[str, AdapterState], coef: Mapping[str, float], me: str
) -> tuple[PeerState, float]:
    """Peer `me`'s mix of its own message and its inbox with its row of the round's coefficients
    (`coef`: {sender: c}, itself included): x <- sum_i c_i x_i over the message keys (the rest of
    x is kept), and under push-sum w <- sum_i c_i w_i. Returns the new state and the factor-mixing
    error of the de-biased models (`mixing_error`; z_i = x_i / w_i weighted by c_i w_i / w)."""
    msgs = {**inbox, me: own_message}
    senders = sorted(coef)
    c = [coef[i] for i in senders]
    tensors = [{k: v for k, v in msgs[i].items() if k != PUSH_SUM_WEIGHT} for i in senders]
    x = {**own.x, **weighted_mean(tensors, c)}
    w, z, states = own.w, c, tensors
    if PUSH_SUM_WEIGHT in own_message:
        ws = [float(msgs[i][PUSH_SUM_WEIGHT][0]) for i in senders]
        w = sum(ci * wi for ci, wi in zip(c, ws))
        z = [ci * wi / w for ci, wi in zip(c, ws)]  # z's convex weights
        states = [{k: v / wi for k, v in t.items()} for t, wi in zip(tensors, ws)]
    error = mixing_error(states, z) if len(senders) > 1 else 0.0
    return PeerState(x, w), error


@STRATEGIES.register("gossip")
@dataclass(frozen=True)
class Gossip(StrategyBase):
    """Decentralized FedAvg over a peer graph (no server; each peer ends with its own model).
    topology: ring | complete | regular (`degree`; `resample`: a fresh one each round) |
    erdos_renyi (`p`; `resample`) | torus (`rows`) | edges (pairs of client ids, or `edges_file`;
    `directed`) | matching (a fresh random matching of the round's peers) | epidemic (each peer
    sends to `fanout` random peers a round). mixing: metropolis (default) | max_degree | push_sum
    (needed by the directed ones; each peer keeps its push-sum weight w in its state, trains and
    exports z = x / w, and a message carries x and w, which the receiver weighs by the sender's
    share 1 / (live out-degree + 1)).
    Round metrics: `consensus_distance` of the round's peers' models after mixing, `agg_error`
    (the factor-mixing error, module docstring), `spectral_gap` of the round's effective mixing
    matrix over the peers that took part (an absent neighbour's weight on the diagonal),
    `graph_spectral_gap` of a static graph's whole matrix, `gossip_messages`."""

    topology: Literal["ring", "complete", "regular", "erdos_renyi", "edges", "torus", "matching", "epidemic"] = "ring"
    degree: Count = 4
    p: Probability = 0.5
    edges: tuple[tuple[str, str], ...] = ()
    edges_file: str | None = None
    directed: bool = False
    rows: Count | None = None
    fanout: Count = 1
    resample: bool = False
    mixing: Literal["metropolis", "max_degree", "push_sum"] = "metropolis"
    rejoin: Literal["own", "fetch"] = "own"

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
        if self.rejoin == "fetch" and self.mixing == "push_sum":
            why = "push-sum keeps the sum of the peers' (x, w); replacing a peer's state with a fetched model breaks it"
            return [Problem("strategy.rejoin", self.rejoin, why, "use rejoin: own with push_sum")]
        if self.edges_file:
            try:
                read_edges(self.edges_file)
            except (OSError, ValueError) as e:
                why = str(e) if isinstance(e, ValueError) else f"cannot be read ({e.strerror})"
                return [Problem("strategy.edges_file", self.edges_file, why, "give a file of `a b` lines")]
        return spec_problems(self.spec, sorted(client_ids), seed)

    def sampler(self, fraction: float, min_peers: int, scheme: str) -> HashSampler:
        """Who takes part in a round (each peer computes it; `sampling.fraction`, `min_clients`,
        `scheme`): the same peers train and mix."""
        return HashSampler(fraction, self.ctx.seed, min_peers, scheme)

    def sources(self, rnd: int, trainers: Sequence[str], previous: Roles | None) -> dict[str, str]:
        """A gossip peer trains from its own model; with `rejoin: fetch`, a peer that did not take
        part in the previous round (offline, or not sampled) first fetches the model of its first
        neighbour (sorted; in-neighbour for a directed graph) that did, counted as a message; a
        peer none of whose neighbours took part keeps its own."""
        if self.rejoin == "own" or previous is None:
            return {t: t for t in trainers}
        ids = tuple(sorted(self.ctx.client_ids))
        graph = round_graph(self.spec, ids, sorted({*trainers, *previous.trainers}), self.ctx.seed, rnd - 1)
        were = set(previous.trainers)
        out = {}
        for t in trainers:
            near = graph.predecessors(t) if graph.is_directed() else graph.neighbors(t)
            fresh = sorted(j for j in near if j in were) if t not in were and t in graph else []
            out[t] = fresh[0] if fresh else t
        return out

    def coefficients(self, rnd: int, live: Sequence[str], roles: Roles | None = None) -> dict[str, dict[str, float]]:
        """{receiver: {sender: c}} of the round over its `live` peers (every peer computes its row)."""
        return round_weights(self.spec, tuple(sorted(self.ctx.client_ids)), sorted(live), self.ctx.seed, rnd)

    def message(self, peer: PeerState) -> AdapterState:
        return peer_message(peer, self.mixing == "push_sum")

    def adopt(self, own: PeerState, message: AdapterState) -> PeerState:
        return adopt_model(own, message)

    def to_score(self, rnd: int, me: str, own: PeerState, inbox: Mapping[str, AdapterState]) -> dict[str, AdapterState]:
        """Gossip scores nothing."""
        return {}

    def mix(
        self,
        me: str,
        own: PeerState,
        inbox: Mapping[str, AdapterState],
        coef: Mapping[str, float],
        losses: Mapping[str, float] | None = None,
    ) -> tuple[PeerState, float]:
        return mix_inbox(own, self.message(own), inbox, coef, me)

    def round_metrics(
        self, coef: Mapping[str, Mapping[str, float]], models: Mapping[str, AdapterState]
    ) -> dict[str, Any]:
        """Consensus distance of the live peers' models after mixing, the round's spectral gap
        (its matrix over the live peers) and a static graph's whole gap."""
        live = sorted(models)
        out: dict[str, Any] = {"consensus_distance": consensus_distance([models[c] for c in live])}
        if len(live) <= SPECTRAL_GAP_MAX_PEERS:
            out["spectral_gap"] = mixing_gap(coefficient_matrix(coef, live))
        gap = _graph_gap(self.spec, tuple(sorted(self.ctx.client_ids)), self.ctx.seed)
        if gap is not None:
            out["graph_spectral_gap"] = gap
        return out

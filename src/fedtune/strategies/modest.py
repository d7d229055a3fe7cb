"""MoDeST: decentralized sampling, no server (de Vos, Dhasade, Kermarrec, Lavoie, Pouwelse and
Sharma, "MoDeST: Bridging the Gap between Federated and Decentralized Learning with Decentralized
Sampling", arXiv:2302.13837 v1; v2 is titled "Decentralized Learning Made Practical with Client
Sampling" and calls the system Plexus).

Each round r a sample of `trainers` (s) peers trains and a sample of `aggregators` (a) peers
aggregates; both are seeded hashes of (seed, role, r, peer) over the membership that every peer
computes for itself (`peer_sampling.ModestSampler`), so no one coordinates. A trainer of round r
fetches the latest model from an aggregator of round r - 1 (trainer k of the sorted sample from
aggregator k mod a, which spreads the load), trains it with the client step, and sends its
model to every aggregator of round r; an aggregator averages the models once at least
ceil(success_fraction * s) of them arrived (uniformly, as the paper's aggregators average the
received models), and holds the average for the next round's trainers. With every trainer's model
arriving, every aggregator holds the same average: FedAvg's round without a server. Fewer than
the success fraction: the aggregators keep what they held (the next trainers fetch that).

What the simulation leaves out of the paper's system: the aggregators' forwarding and the
membership and liveness information piggy-backed on messages (the membership here is the
registered peers online in the round, `sampling.availability`); timeouts are the injected faults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.client.run import PeerState
from fedtune.errors import Problem
from fedtune.peer_sampling import ModestSampler, Roles
from fedtune.strategies.base import STRATEGIES, Capabilities, StrategyBase
from fedtune.strategies.decentralized import adopt_model, consensus_distance, mix_inbox, peer_message
from fedtune.strategies.params import Count, Probability
from fedtune.types import AdapterState


def aggregation_weights(live: Sequence[str], aggregators: Sequence[str], need: int) -> dict[str, dict[str, float]]:
    """{aggregator: {trainer: 1 / |live|}} when at least `need` trainers' models arrived, else {}."""
    if not live or len(live) < need:
        return {}
    share = 1.0 / len(live)
    return {a: dict.fromkeys(sorted(live), share) for a in sorted(aggregators)}


@STRATEGIES.register("modest")
@dataclass(frozen=True)
class MoDeST(StrategyBase):
    """MoDeST (arXiv:2302.13837): each round `trainers` seeded-sampled peers train the latest
    model (fetched from the previous round's aggregators) and send it to `aggregators` sampled
    peers, which average it once `success_fraction` of the trainers' models arrived. The round's
    sample replaces `sampling.fraction`. Metrics: `consensus_distance` among the aggregators
    (0 when all received every model), `aggregated` (1 if they averaged), message counts."""

    trainers: Count = 2
    aggregators: Count = 1
    success_fraction: Probability = 1.0

    capabilities = Capabilities(
        has_global=False, personalized=True, transmits=False, peer_to_peer=True, own_sampling=True
    )

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Problem]:
        n, out = len(client_ids), []
        for name, k in (("trainers", self.trainers), ("aggregators", self.aggregators)):
            if not 0 < k <= n:
                out.append(Problem(f"strategy.{name}", k, f"needs 1 to {n} peers (the registered peers)", ""))
        if not 0.0 < self.success_fraction <= 1.0:
            out.append(Problem("strategy.success_fraction", self.success_fraction, "must be in (0, 1]", "e.g. 1.0"))
        return out

    def sampler(self, fraction: float, min_peers: int, scheme: str) -> ModestSampler:
        return ModestSampler(self.trainers, self.aggregators, self.ctx.seed)

    def sources(self, rnd: int, trainers: Sequence[str], previous: Roles | None) -> dict[str, str]:
        """Trainer k (sorted) fetches from aggregator k mod a of the previous round (round 1: its own)."""
        if previous is None or not previous.mixers:
            return {t: t for t in trainers}
        agg = previous.mixers
        return {t: agg[k % len(agg)] for k, t in enumerate(sorted(trainers))}

    def coefficients(self, rnd: int, live: Sequence[str], roles: Roles) -> dict[str, dict[str, float]]:
        need = math.ceil(self.success_fraction * len(roles.trainers))
        return aggregation_weights(live, roles.mixers, need)

    def message(self, peer: PeerState) -> AdapterState:
        return peer_message(peer, push_sum=False)

    def adopt(self, own: PeerState, message: AdapterState) -> PeerState:
        return adopt_model(own, message)

    def to_score(self, rnd: int, me: str, own: PeerState, inbox: Mapping[str, AdapterState]) -> dict[str, AdapterState]:
        """MoDeST's aggregators score nothing."""
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
        return {
            "consensus_distance": consensus_distance([models[c] for c in sorted(models)]),
            "aggregated": int(bool(coef)),
        }

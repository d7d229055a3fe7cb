"""PCL without a server: the trust-weighted mix of PCL (arXiv:2404.09753; the server form is
`strategies/personal.py::PCL`) done by every peer over its graph neighbours, after gossip's
local training.

The server form replaces client i's adapter by sum_j W_ij theta_j with W = row-softmax of a trust
score over all clients. Peer to peer, receiver j does the same over the models that reached it,
its own included (its row of the round's gossip coefficients names them; a lost message drops
out of the row as a lost neighbour does):

    x_j <- sum_{i in R_j} W_ji x_i,    W_ji = softmax_{i in R_j}(score_ji),    R_j = {j} + the senders that reached j

- `trust: weights`: score_ji = PCL's strategy-1 similarity of the two adapters (the row-wise
  cosines of every message tensor, averaged over the rows; `personal.weight_similarity`): j
  computes it from the messages it already holds;
- `trust: val`: score_ji = -perplexity of x_i on j's own validation blocks (PCL's strategy 2),
  scored by j in its own process (`to_score`, the engine's `receiver_losses`): nothing more
  travels, no data leaves j. PCL's third trust (`predictions`, distances of top-k logits on a
  reference set the clients contribute) needs raw data from the peers and is not offered here.

The gossip coefficients only say who is in the row; the trust decides the weights. Rows are
stochastic, not doubly stochastic: the peers' average is not kept (each peer personalizes, as in
the server form). Push-sum is refused (its column sums would break). Round metrics: gossip's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.client.run import PeerState
from fedtune.errors import Problem
from fedtune.strategies.base import STRATEGIES, Capabilities
from fedtune.strategies.decentralized import Gossip, mix_inbox
from fedtune.strategies.personal import val_trust, weight_similarity
from fedtune.types import AdapterState


def trust_row(
    me: str, senders: Sequence[str], messages: Mapping[str, AdapterState], losses: Mapping[str, float] | None, kind: str
) -> dict[str, float]:
    """Receiver `me`'s weights over `senders` (itself among them): softmax of its trust scores."""
    if kind == "val":
        if losses is None:
            raise ValueError("pcl_p2p with trust 'val' scores models on each receiver's own data: it needs the engine")
        # scores of Python floats, on the host on purpose: the row leaves as Python floats (.tolist())
        scores = torch.tensor([val_trust(losses[i]) for i in senders], dtype=torch.float64)
    else:
        scores = weight_similarity([messages[i] for i in senders])[list(senders).index(me)]
    return dict(zip(senders, torch.softmax(scores, dim=0).tolist()))


@STRATEGIES.register("pcl_p2p")
@dataclass(frozen=True)
class PCLP2P(Gossip):
    """PCL's trust-weighted mix (arXiv:2404.09753) per peer over any symmetric gossip topology
    (the `gossip` options): `trust: weights` (adapter similarity) or `val` (-perplexity on the
    receiver's own validation blocks). Module docstring."""

    trust: Literal["weights", "val"] = "weights"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """'val' scores the received models on each receiver's data (the engine's scoring)."""
        return Capabilities(
            has_global=False, personalized=True, transmits=False, peer_to_peer=True, scores_peers=self.trust == "val"
        )

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Problem]:
        out = super().network_problems(client_ids, seed)
        if self.mixing == "push_sum":
            why = "trust rows would break push-sum's column sums (the peers' mass)"
            out.append(Problem("strategy.mixing", self.mixing, why, "use a symmetric topology and mixing: metropolis"))
        return out

    def to_score(self, rnd: int, me: str, own: PeerState, inbox: Mapping[str, AdapterState]) -> dict[str, AdapterState]:
        """'val': its own model and every model that reached it; 'weights': nothing to score."""
        return {me: self.message(own), **inbox} if self.trust == "val" else {}

    def mix(
        self,
        me: str,
        own: PeerState,
        inbox: Mapping[str, AdapterState],
        coef: Mapping[str, float],
        losses: Mapping[str, float] | None = None,
    ) -> tuple[PeerState, float]:
        mine = self.message(own)
        senders = sorted(i for i in coef if i == me or i in inbox)
        row = trust_row(me, senders, {**inbox, me: mine}, losses, self.trust)
        return mix_inbox(own, mine, {i: inbox[i] for i in senders if i != me}, row, me)

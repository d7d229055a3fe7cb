"""Bristle without a server (Verbraeken, de Vos and Pouwelse, "Bristle: Decentralized Federated
Learning in Byzantine, Non-i.i.d. Environments", arXiv:2110.11006): every peer integrates its
neighbours' models itself, robustly, after gossip's local training.

The paper (its exact prioritiser split and integrator formula could not be retrieved; this is
our reading of its description) exchanges only a frozen-backbone network's output layer and, per
receiver, (1) a distance-based prioritiser ranks the received layers by their distance to its own
and keeps the closest ("familiar") plus a few others (exploration); (2) a performance-based
integrator scores each kept layer class by class on a small local i.i.d. test set and weighs it by
its performance relative to the receiver's own. Adapted to LM adapters:

- what travels is the adapter's trainable tensors (gossip's message), the backbone is frozen;
- prioritiser: receiver j ranks the senders i by d_ij = ||x_i - x_j|| (all message tensors as one
  vector), keeps the `keep` nearest and `explore` of the rest drawn from (seed, round, j);
- integrator: a language model has no per-class output rows, so j scores whole models, its own
  and each kept one, by their loss on its own validation blocks (`reference_blocks` of them; the
  receiver's data is its one "class") and trusts sender i by
      s_ij = clip(1 - (L_j(x_i) - L_j(x_j)) / (tolerance * L_j(x_j)), 0, 1)
  (1 for a model at least as good as its own, 0 for one `tolerance` worse or more);
- the mix is gossip's row with each sender's weight scaled by its trust, the rest kept on the
  diagonal: x_j <- (1 - sum_i s_ij W_ij) x_j + sum_i s_ij W_ij x_i. Rows stay stochastic (the
  honest peers' average is no longer kept exactly: the price of dropping a sender's mass).

A Byzantine neighbour (`attack:` injection: its model carries the poisoned updates) scores badly
on every honest receiver's data and gets weight 0. Scoring is each receiver's local computation
on its own data: no raw data and no extra bytes travel (unlike the server-side `bristle`, which
scores on a reference set the clients contribute). Push-sum is refused: trust-scaled rows would
break its column sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedtune.client.run import PeerState
from fedtune.errors import Problem
from fedtune.seeding import numpy_rng
from fedtune.strategies.base import STRATEGIES, Capabilities
from fedtune.strategies.decentralized import Gossip, mix_inbox
from fedtune.strategies.params import Count, NonNegative, NonNegativeCount
from fedtune.types import AdapterState


def distance(a: AdapterState, b: AdapterState) -> float:
    """||a - b|| over the tensors of `a` (fp64)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def prioritise(distances: Mapping[str, float], keep: int | None, explore: int, rng_pick: Sequence[int]) -> list[str]:
    """The senders a receiver scores: the `keep` nearest (None: all; ties by id), plus `explore`
    of the rest in the order of the seeded permutation `rng_pick` (indices into the rest)."""
    order = sorted(distances, key=lambda i: (distances[i], i))
    near = order if keep is None else order[:keep]
    rest = order[len(near) :]
    return sorted(near + [rest[k] for k in rng_pick if k < len(rest)][:explore])


def trust(own_loss: float, loss: float, tolerance: float) -> float:
    """s = clip(1 - (loss - own_loss) / (tolerance * own_loss), 0, 1); 0 for a non-finite loss."""
    if not math.isfinite(loss):
        return 0.0
    return min(1.0, max(0.0, 1.0 - (loss - own_loss) / (tolerance * own_loss)))


def trusted_row(me: str, coef: Mapping[str, float], losses: Mapping[str, float], tolerance: float) -> dict[str, float]:
    """Gossip's row `coef` with each sender's weight times its trust (unscored senders: 0) and
    the removed weight back on the receiver's own diagonal entry."""
    row = {i: c * trust(losses[me], losses[i], tolerance) if i in losses else 0.0 for i, c in coef.items() if i != me}
    return {me: 1.0 - sum(row.values()), **row}


@STRATEGIES.register("bristle_p2p")
@dataclass(frozen=True)
class BristleP2P(Gossip):
    """Bristle (arXiv:2110.11006) per peer, over any symmetric gossip topology (the `gossip`
    options): each receiver scores its own model and its `keep` nearest senders (plus `explore`
    others) on `reference_blocks` of its validation blocks and scales each sender's gossip
    weight by its trust (module docstring; `tolerance`: the relative loss increase at which
    trust reaches 0). Same round metrics as gossip."""

    keep: Count | None = None
    explore: NonNegativeCount = 0
    tolerance: NonNegative = 0.2
    reference_blocks: Count = 4

    capabilities = Capabilities(
        has_global=False, personalized=True, transmits=False, peer_to_peer=True, scores_peers=True
    )

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Problem]:
        out = super().network_problems(client_ids, seed)
        if self.mixing == "push_sum":
            why = "trust-scaled rows would break push-sum's column sums (the peers' mass)"
            out.append(Problem("strategy.mixing", self.mixing, why, "use a symmetric topology and mixing: metropolis"))
        if not self.tolerance > 0:
            out.append(Problem("strategy.tolerance", self.tolerance, "must be > 0", "e.g. 0.2"))
        return out

    def to_score(self, rnd: int, me: str, own: PeerState, inbox: Mapping[str, AdapterState]) -> dict[str, AdapterState]:
        """Its own model and the prioritised senders' (distance to its own message)."""
        mine = self.message(own)
        dist = {i: distance(mine, m) for i, m in inbox.items()}
        pick = numpy_rng(self.ctx.seed, "bristle-explore", rnd, me).permutation(len(inbox)).tolist()
        return {me: mine, **{i: inbox[i] for i in prioritise(dist, self.keep, self.explore, pick)}}

    def mix(
        self,
        me: str,
        own: PeerState,
        inbox: Mapping[str, AdapterState],
        coef: Mapping[str, float],
        losses: Mapping[str, float] | None = None,
    ) -> tuple[PeerState, float]:
        if losses is None:
            raise ValueError("bristle_p2p scores models on each receiver's own data: it needs the engine's scoring")
        row = {i: c for i, c in trusted_row(me, coef, losses, self.tolerance).items() if c > 0 or i == me}
        return mix_inbox(own, self.message(own), {i: inbox[i] for i in row if i != me}, row, me)

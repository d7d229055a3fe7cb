"""SAFARI (Mao et al., arXiv:2204.02321): federated learning over unreliable links. When a client's
update does not arrive, averaging only what arrived biases the model towards the clients with
good links; SAFARI substitutes a surrogate for each missing update, built from the current updates
of the clients most similar to it, with similarity estimated from previously received updates.

Here: similarity = cosine between clients' last received updates (all adapter tensors
flattened); the surrogate for a missing client m is the mean of the current updates of its
`neighbours` most similar clients that did reply; the aggregate is the example-weighted mean over
replies and surrogates (m weighted by its last known example count). A client never heard from has
no surrogate. Pair it with sparse uploads (`codec: topk`) for SAFARI's sparse client updates.
Missing = every client heard from before that did not reply this round, so use it with full
participation (`sampling.fraction: 1`); the fault injection `sampling.dropout` simulates the links.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.strategies.base import STRATEGIES, Combined, GlobalModel, weighted_mean
from fedtune.strategies.params import NonNegativeCount
from fedtune.types import AdapterState, ClientUpdate, add_states


def flat(state: AdapterState) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


@STRATEGIES.register("safari")
@dataclass(frozen=True)
class Safari(GlobalModel):
    """SAFARI: a surrogate from the most similar clients replaces each missing update."""

    neighbours: NonNegativeCount = 1

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        last: dict[str, AdapterState] = dict(state.get("last", {}))
        sizes: dict[str, int] = dict(state.get("sizes", {}))
        present = {u.client_id: u for u in updates}
        deltas = [u.delta for u in updates]
        weights = [float(u.num_examples) for u in updates]
        used: dict[str, list[str]] = {}
        for m in sorted(c for c in last if c not in present):
            peers = [c for c in present if c in last]
            if not peers:
                continue
            sims = {c: cosine(flat(last[m]), flat(last[c])) for c in peers}
            top = sorted(peers, key=lambda c: (-sims[c], c))[: self.neighbours]
            deltas.append(weighted_mean([present[c].delta for c in top], [1.0 / len(top)] * len(top)))
            weights.append(float(sizes[m]))
            used[m] = top
        total = sum(weights)
        new = add_states(state["global"], weighted_mean(deltas, [w / total for w in weights]))
        for u in updates:
            last[u.client_id], sizes[u.client_id] = u.delta, u.num_examples
        metrics = {"surrogates": used} if used else {}
        return new, {"last": last, "sizes": sizes}, metrics

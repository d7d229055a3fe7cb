"""FedAvg (McMahan et al., arXiv:1602.05629): example-weighted mean of client updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.strategies.base import (
    STRATEGIES,
    Capabilities,
    Combined,
    GlobalModel,
    example_weights,
    sorted_updates,
    weighted_mean,
)
from fedtune.types import AdapterState, ClientUpdate, add_states


def fedavg_aggregate(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState:
    """global + sum_k p_k delta_k with p_k = n_k / sum n (independent of client order)."""
    ups = sorted_updates(updates)
    mean_delta = weighted_mean([u.delta for u in ups], example_weights(ups))
    return add_states(global_state, mean_delta)


@STRATEGIES.register("fedavg")
@dataclass(frozen=True)
class FedAvg(GlobalModel):
    """FedAvg of adapter tensors, weighted by client examples (arXiv:1602.05629)."""

    capabilities = Capabilities(sum_only=True)  # a weighted sum: works under secure aggregation

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        return fedavg_aggregate(state["global"], updates), {}, {}

"""FedAvg (McMahan et al., arXiv:1602.05629): example-weighted mean of client updates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.strategies.base import STRATEGIES, example_weights, sorted_updates, weighted_mean
from fedtune.types import AdapterState, ClientUpdate, add_states


def fedavg_aggregate(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState:
    """global + sum_k p_k delta_k with p_k = n_k / sum n (independent of client order)."""
    ups = sorted_updates(updates)
    mean_delta = weighted_mean([u.delta for u in ups], example_weights(ups))
    return add_states(global_state, mean_delta)


@STRATEGIES.register("fedavg")
@dataclass(frozen=True)
class FedAvg:
    """FedAvg of adapter tensors, weighted by client examples (arXiv:1602.05629)."""

    has_global = True
    personalized = False
    pools_data = False

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return {cid: state["global"] for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any]
    ) -> tuple[AdapterState, dict[str, Any]]:
        if not updates:
            return state["global"], state
        new = fedavg_aggregate(state["global"], updates)
        return new, {**state, "global": new}

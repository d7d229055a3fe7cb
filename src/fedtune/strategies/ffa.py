"""FedIT (naive factor averaging, inexact) and FFA-LoRA (A frozen and shared, exact)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.strategies.base import STRATEGIES, example_weights, sorted_updates
from fedtune.strategies.fedavg import fedavg_aggregate
from fedtune.strategies.lora_math import B_SUFFIX, mean_of_products, products, relative_error
from fedtune.types import AdapterState, ClientUpdate, add_states


@STRATEGIES.register("fedit")
@dataclass(frozen=True)
class FedIT:
    """FedIT (arXiv:2305.05644): average A and B separately. INEXACT: the global B_bar A_bar misses
    sum_k p_k (B_k - B_bar)(A_k - A_bar); the relative error is logged every round as agg_error."""

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
        ups = sorted_updates(updates)
        new = fedavg_aggregate(state["global"], ups)
        clients = [add_states(state["global"], u.delta) for u in ups]
        err = relative_error(mean_of_products(clients, example_weights(ups)), products(new))
        return new, {**state, "global": new, "round_metrics": {"agg_error": err}}


@STRATEGIES.register("ffa_lora")
@dataclass(frozen=True)
class FFALoRA:
    """FFA-LoRA (arXiv:2403.12313): A random, shared by seed and frozen; only B is trained, sent
    and averaged, so s * B_bar A = sum_k p_k s B_k A exactly, with half of FedIT's bytes."""

    has_global = True
    personalized = False
    pools_data = False

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        only_b = {k: v for k, v in state["global"].items() if k.endswith(B_SUFFIX)}
        return {cid: only_b for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any]
    ) -> tuple[AdapterState, dict[str, Any]]:
        if not updates:
            return state["global"], state
        new = fedavg_aggregate(state["global"], updates)  # deltas carry B only: A stays shared
        return new, {**state, "global": new}

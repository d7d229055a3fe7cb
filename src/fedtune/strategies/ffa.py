"""FedIT (naive factor averaging, inexact) and FFA-LoRA (A frozen and shared, exact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.strategies.base import EXACT_LORA, STRATEGIES, Capabilities, Combined, GlobalModel, example_weights
from fedtune.strategies.fedavg import fedavg_aggregate
from fedtune.strategies.lora_math import B_SUFFIX, mean_of_products, products, relative_error
from fedtune.types import AdapterState, ClientUpdate, add_states


@STRATEGIES.register("fedit")
@dataclass(frozen=True)
class FedIT(GlobalModel):
    """FedIT (arXiv:2305.05644): average A and B separately. INEXACT: the global B_bar A_bar misses
    sum_k p_k (B_k - B_bar)(A_k - A_bar); the relative error is logged every round as agg_error."""

    capabilities = Capabilities(sum_only=True)  # a weighted sum: works under secure aggregation

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        new = fedavg_aggregate(state["global"], updates)
        clients = [add_states(state["global"], u.delta) for u in updates]
        err = relative_error(mean_of_products(clients, example_weights(updates)), products(new))
        return new, {}, {"agg_error": err}


@STRATEGIES.register("ffa_lora")
@dataclass(frozen=True)
class FFALoRA(GlobalModel):
    """FFA-LoRA (arXiv:2403.12313): A random, shared by seed and frozen; only B is trained, sent
    and averaged, so s * B_bar A = sum_k p_k s B_k A exactly, with half of FedIT's bytes."""

    capabilities = Capabilities(sum_only=True, algebras=EXACT_LORA)  # a weighted sum: works under secure aggregation

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return {k: v for k, v in state["global"].items() if k.endswith(B_SUFFIX)}

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        return fedavg_aggregate(state["global"], updates), {}, {}  # deltas carry B only: A stays shared

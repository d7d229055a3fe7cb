"""Exact aggregation by folding into the frozen base weights: FedEx-LoRA and FLoRA.

Both keep a dense per-module offset `<module>.base_delta` ([out, in]) in the global state; clients
receive it (counted as downlink bytes), apply W = W0 + base_delta, and never train it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.models.adapters import BASE_DELTA
from fedtune.seeding import torch_generator
from fedtune.strategies.base import (
    EXACT_LORA,
    STRATEGIES,
    Capabilities,
    Combined,
    GlobalModel,
    example_weights,
    weighted_mean,
)
from fedtune.strategies.lora_math import A_SUFFIX, B_SUFFIX, lora_modules
from fedtune.types import AdapterState, ClientUpdate, add_states


def with_zero_base(state: AdapterState) -> AdapterState:
    """Add a zero base_delta [d, k] for each LoRA module."""
    out = dict(state)
    for m in lora_modules(state):
        d, k = state[m + B_SUFFIX].shape[0], state[m + A_SUFFIX].shape[1]
        out.setdefault(m + BASE_DELTA, torch.zeros(d, k))
    return out


def weighted_products(
    clients: Sequence[AdapterState], weights: Sequence[float], scale: float
) -> dict[str, torch.Tensor]:
    """s * sum_k p_k B_k @ A_k per module (fp64 accumulation), for factors of any (per-client) rank."""
    out: dict[str, torch.Tensor] = {}
    for m in lora_modules(clients[0]):
        acc = sum(w * c[m + B_SUFFIX].double() @ c[m + A_SUFFIX].double() for w, c in zip(weights, clients))
        out[m] = (scale * acc).float()  # type: ignore[union-attr]
    return out


def client_states(sent: Mapping[str, AdapterState], updates: Sequence[ClientUpdate]) -> list[AdapterState]:
    """Each client's trained tensors = what it received + its delta."""
    return [add_states({k: v for k, v in sent[u.client_id].items() if k in u.delta}, u.delta) for u in updates]


@STRATEGIES.register("fedex_lora")
@dataclass(frozen=True)
class FedExLoRA(GlobalModel):
    """FedEx-LoRA (arXiv:2410.09432): average A and B, and fold the residual
    s(sum_k p_k B_k A_k - B_bar A_bar) into the base weights. Exact; the dense residual is downlink."""

    capabilities = Capabilities(base_offsets=True, algebras=EXACT_LORA)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": with_zero_base(global_state)}

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        glob = state["global"]
        p = example_weights(updates)
        clients = [add_states({k: glob[k] for k in u.delta}, u.delta) for u in updates]
        avg = weighted_mean(clients, p)
        new = {**glob, **avg}
        for m, target in weighted_products(clients, p, self.ctx.lora_scale).items():
            naive = self.ctx.lora_scale * (avg[m + B_SUFFIX].double() @ avg[m + A_SUFFIX].double())
            new[m + BASE_DELTA] = glob[m + BASE_DELTA] + (target.double() - naive).float()
        return new, {}, {}


@STRATEGIES.register("flora")
@dataclass(frozen=True)
class FLoRA(GlobalModel):
    """FLoRA stacking (arXiv:2409.05976): the stacked update s * sum_k p_k B_k A_k (exact, any
    per-client rank) is merged into the base weights; every client restarts LoRA each round (A
    fresh from a seeded draw, B = 0). Clients receive the dense merged offset each round."""

    capabilities = Capabilities(heterogeneous_ranks=True, base_offsets=True, algebras=EXACT_LORA)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": with_zero_base(global_state)}

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return truncate_rank(state["global"], self.ctx.client_ranks.get(client_id))

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        glob = state["global"]
        sent = self.configure(rnd, [u.client_id for u in updates], state)
        merged = weighted_products(client_states(sent, updates), example_weights(updates), self.ctx.lora_scale)
        new = fresh_lora(glob, torch_generator(self.ctx.seed, "flora-reinit", rnd))
        for m, dw in merged.items():
            new[m + BASE_DELTA] = glob[m + BASE_DELTA] + dw
        return new, {}, {}


def truncate_rank(state: AdapterState, r: int | None) -> AdapterState:
    """A[:r] and B[:, :r] (a client of rank r); other tensors as they are."""
    if r is None:
        return state
    out = {}
    for k, v in state.items():
        if k.endswith(A_SUFFIX):
            out[k] = v[:r]
        elif k.endswith(B_SUFFIX):
            out[k] = v[:, :r]
        else:
            out[k] = v
    return out


def fresh_lora(state: AdapterState, gen: torch.Generator) -> AdapterState:
    """A ~ U(-1/sqrt(k), 1/sqrt(k)) (PEFT's kaiming-uniform(a=sqrt 5) bound), B = 0."""
    out = dict(state)
    for m in lora_modules(state):
        a = state[m + A_SUFFIX]
        bound = 1.0 / a.shape[1] ** 0.5
        out[m + A_SUFFIX] = (torch.rand(a.shape, generator=gen) * 2 - 1) * bound
        out[m + B_SUFFIX] = torch.zeros_like(state[m + B_SUFFIX])
    return out

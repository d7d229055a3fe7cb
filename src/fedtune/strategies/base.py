"""The Strategy protocol, its registry, and the pure aggregation functions strategies share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from fedtune.registry import Registry
from fedtune.types import AdapterState, ClientUpdate


class Strategy(Protocol):
    """Server-side logic of a method. State is a plain value passed in and returned, so a
    checkpoint is just that value and a resumed run continues exactly.

    Class attributes say how the recipe treats the strategy:
        has_global: there is one shared model to evaluate and export.
        personalized: each client ends with its own model (configure sends it).
        pools_data: train on the pooled data of all clients (the centralized upper bound).
        transmits: model payloads cross the network (False for `local` and `centralized`, where
            the training happens where the adapter lives: their payload bytes count as 0).
    """

    has_global: bool
    personalized: bool
    pools_data: bool
    transmits: bool

    def init_state(self, global_state: AdapterState) -> Any: ...

    def configure(self, rnd: int, client_ids: Sequence[str], state: Any) -> Mapping[str, AdapterState]: ...

    def aggregate(self, rnd: int, updates: Sequence[ClientUpdate], state: Any) -> tuple[AdapterState, Any]: ...


STRATEGIES: Registry[type] = Registry("strategy")


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j (FedAvg weights)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [u.num_examples / total for u in updates]


def weighted_mean(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """sum_k w_k * state_k, key by key (fp64 accumulation, fp32 result)."""
    out: AdapterState = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += w * s[key].to(torch.float64)
        out[key] = acc.to(torch.float32)
    return out


def sorted_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Updates in client-id order, so aggregation does not depend on arrival order."""
    return sorted(updates, key=lambda u: u.client_id)


class GlobalModel:
    """Plumbing shared by strategies with one global adapter (one level of inheritance):
    state = {"global": adapter, ...}; `send` picks what a client receives (all of it by default);
    `combine` does the method's maths on the updates in client-id order. Subclasses are frozen
    dataclasses holding only hyperparameters."""

    has_global = True
    personalized = False
    pools_data = False
    transmits = True

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state}

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return state["global"]

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return {cid: self.send(state, cid) for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any]
    ) -> tuple[AdapterState, dict[str, Any]]:
        if not updates:
            return state["global"], state
        new, extra = self.combine(rnd, sorted_updates(updates), state)
        return new, {**state, **extra, "global": new}

    def combine(
        self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]
    ) -> tuple[AdapterState, dict[str, Any]]:
        """(new global adapter, other state entries to update) from sorted, non-empty updates."""
        raise NotImplementedError

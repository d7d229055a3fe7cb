"""The nouns of fedtune: adapter state, client updates and failures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Named tensors of an adapter (PEFT key format without the adapter name), always on CPU.
AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after a round of local training.

    Attributes:
        client_id: the client's id.
        delta: trained adapter minus the adapter the client received (decoded uplink payload).
        num_examples: number of training blocks the client holds (FedAvg weight).
        metrics: train loss, steps, seconds, ...
        bytes_up: size of the serialized uplink payload.
        bytes_down: size of the serialized downlink payload this client received.
    """

    client_id: str
    delta: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True)
class ClientFailure:
    """An expected failure of one client in one round (dropout, timeout, rejected update)."""

    client_id: str
    reason: str
    bytes_down: int = 0
    bytes_up: int = 0  # a rejected update still crossed the network


def add_states(a: AdapterState, b: AdapterState, scale: float = 1.0) -> AdapterState:
    """Return a + scale * b; keys of `a` missing from `b` are kept as they are (partial deltas)."""
    return {k: a[k] + scale * b[k] if k in b else a[k] for k in a}


def sub_states(a: AdapterState, b: AdapterState) -> AdapterState:
    """Return a - b (same keys)."""
    return {k: a[k] - b[k] for k in a}

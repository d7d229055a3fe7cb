"""One client's round: load the received adapter, train locally, return the delta."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedtune.client.train import TrainSpec, local_train_
from fedtune.data.blocks import Shard
from fedtune.models.adapters import get_state, set_state_, trainable_parameters
from fedtune.seeding import derive_seed, torch_generator
from fedtune.types import AdapterState, sub_states


def client_round(
    model: Any,
    received: AdapterState,
    shard: Shard,
    spec: TrainSpec,
    seed: int,
    rnd: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[AdapterState, dict[str, float]]:
    """Train from `received` on the client's shard; return (delta, metrics). Mutates only the
    adapter tensors of the shared model, which the next client overwrites."""
    set_state_(model, received)
    params = trainable_parameters(model)
    gen = torch_generator(seed, "train", rnd, shard.client_id)
    torch.manual_seed(derive_seed(seed, "dropout", rnd, shard.client_id))  # LoRA dropout draws globally
    metrics = local_train_(model, params, shard.train, spec, gen, on_step=on_step)
    return sub_states(get_state(model), received), metrics

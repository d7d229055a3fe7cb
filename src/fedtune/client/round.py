"""One client's round: load the received adapter, train locally, return the delta."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedtune.client.train import TrainSpec, local_train_, proximal_term
from fedtune.data.blocks import Shard
from fedtune.models.adapters import get_state, select_trainable_, set_state_
from fedtune.seeding import derive_seed, torch_generator
from fedtune.types import AdapterState


def client_round(
    model: Any,
    received: AdapterState,
    shard: Shard,
    spec: TrainSpec,
    seed: int,
    rnd: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[AdapterState, dict[str, float]]:
    """Train the received adapter tensors on the client's shard; return (delta, metrics).

    Only the tensors in `received` train (and come back as a delta); the others keep their
    shared initial values. Mutates only adapter tensors of the shared model, which the next
    client overwrites."""
    set_state_(model, received)
    params = select_trainable_(model, received)
    gen = torch_generator(seed, "train", rnd, shard.client_id)
    torch.manual_seed(derive_seed(seed, "dropout", rnd, shard.client_id))  # LoRA dropout draws globally
    extra = None
    if spec.prox_mu > 0:
        extra = proximal_term(params, [received[k].clone() for k in sorted(received)], spec.prox_mu)
    metrics = local_train_(model, params, shard.train, spec, gen, extra_loss=extra, on_step=on_step)
    trained = get_state(model)
    return {k: trained[k] - received[k] for k in received}, metrics

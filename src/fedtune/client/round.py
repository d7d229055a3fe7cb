"""One client's round: load the received adapter, train locally, return the delta."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedtune.client.train import TrainSpec, local_train_, proximal_term
from fedtune.data.blocks import Shard
from fedtune.models.adapters import (
    adapter_parameters,
    crop_to,
    get_state,
    select_trainable_,
    set_state_,
    trainable_keys,
)
from fedtune.seeding import derive_seed, torch_generator
from fedtune.types import AdapterState

PenaltyFactory = Callable[[Any, AdapterState], Any]


def client_round(
    model: Any,
    received: AdapterState,
    shard: Shard,
    spec: TrainSpec,
    seed: int,
    rnd: int,
    on_step: Callable[[int, int, float], None] | None = None,
    penalty: PenaltyFactory | None = None,
) -> tuple[AdapterState, dict[str, float]]:
    """Train the received adapter tensors on the client's shard; return (delta, metrics).

    Only the tensors in `received` train (and come back as a delta); the others keep their
    shared initial values. Mutates only adapter tensors of the shared model, which the next
    client overwrites. `penalty(params_by_key, received)` may add a strategy's client-side
    regulariser (HetLoRA's rank self-pruning term)."""
    set_state_(model, received)
    lora = {k: received[k] for k in trainable_keys(received)}
    params = select_trainable_(model, lora)
    gen = torch_generator(seed, "train", rnd, shard.client_id)
    torch.manual_seed(derive_seed(seed, "dropout", rnd, shard.client_id))  # LoRA dropout draws globally
    terms = []
    if spec.prox_mu > 0:
        terms.append(proximal_term(params, [p.detach().clone() for p in params], spec.prox_mu))
    if penalty is not None:
        params_by_key = {k: p for k, p in adapter_parameters(model).items() if k in lora}
        term = penalty(params_by_key, lora)
        if term is not None:
            terms.append(term)
    extra = (lambda: sum(t() for t in terms)) if terms else None  # noqa: E731
    metrics = local_train_(model, params, shard.train, spec, gen, extra_loss=extra, on_step=on_step)
    trained = get_state(model)
    # the delta has the received shapes (a rank-r_k client returns rank-r_k factors)
    return {k: crop_to(trained[k], v.shape) - v for k, v in lora.items()}, metrics

"""One client's round: load the received adapter, train locally, return the delta."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import reduce
from typing import Any

import torch

from fedtune.adapters import adapter_of
from fedtune.adapters.base import Adapter
from fedtune.client.ghost_noise import ghost_noise_injected
from fedtune.client.train import SideGroup, TrainData, TrainSpec, local_train_, proximal_term
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
    private: AdapterState | None = None,
    variant: int | None = None,
    adapter: Adapter | None = None,
) -> tuple[AdapterState, dict[str, float], AdapterState]:
    """Train the received adapter tensors on the client's shard; return (delta, metrics, private).

    Only the tensors in `received` and `private` train; only the received ones come back, as a
    delta (the others keep their shared initial values). `private` are tensors that never leave
    the client (CoMiGS's specialists and router); their trained values are returned for the
    client to keep. `variant` is the client's adapter variant (a mixture's expert count).
    `adapter` (built from the config: its options) gives the parameter groups and the auxiliary
    loss; default: the injected kind with default options. Its first group trains on the
    client's steps; a second one may follow its own schedule (`ParamGroup.every`).
    Mutates only adapter tensors of the shared model, which the next client overwrites.
    `penalty(params_by_key, received)` may add a strategy's client-side regulariser (HetLoRA's
    rank self-pruning term)."""
    private = private or {}
    adapter = adapter if adapter is not None else adapter_of(model)
    adapter.use_client_(model, variant)
    set_state_(model, {**received, **private})
    lora = {k: received[k] for k in trainable_keys(received)}
    keys = [*lora, *trainable_keys(private)]
    select_trainable_(model, keys)
    by_key = adapter_parameters(model)
    main, *rest = adapter.param_groups(keys)
    if len(rest) > 1:
        raise ValueError(f"adapter {adapter.kind!r}: at most two parameter groups (main and one on its own schedule)")
    params = [by_key[k] for k in main.keys]
    group = rest[0] if rest else None
    side = None
    if group is not None:
        lr = group.lr if group.lr is not None else spec.lr
        own = TrainData(shard.val, shard.val_mask) if shard.val.shape[0] > 0 else None  # else the training rows
        offset = (rnd - 1) * spec.num_steps(int(shard.train.shape[0]))
        side = SideGroup([by_key[k] for k in group.keys], lr, group.every, group.steps, group.name, own, offset)
    # the region each parameter really has for this client (a rank-r_k client inside the max-rank
    # LoRA): DP-SGD's noise goes only there, so the padded rows stay exactly zero
    regions = [lora[k].shape if k in lora else by_key[k].shape for k in main.keys]
    gen = torch_generator(seed, "train", rnd, shard.client_id)
    torch.manual_seed(derive_seed(seed, "dropout", rnd, shard.client_id))  # LoRA dropout draws globally
    terms = []
    if spec.prox_mu > 0:
        terms.append(proximal_term(params, [p.detach().clone() for p in params], spec.prox_mu))
    if penalty is not None:
        term = penalty({k: p for k, p in by_key.items() if k in lora}, lora)
        if term is not None:
            terms.append(term)
    extra = (lambda: reduce(torch.add, [t() for t in terms])) if terms else None  # noqa: E731
    ghost: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if spec.ghost_batch is not None:  # a regulariser of this local step only (eval mode: no noise)
        ghost = ghost_noise_injected(
            model,
            spec.ghost_batch,
            torch_generator(seed, "ghost", rnd, shard.client_id),
            spec.ghost_eps,
            spec.ghost_last,
        )
    with ghost:
        metrics = local_train_(
            model,
            params,
            TrainData(shard.train, shard.train_mask, shard.train_doc if spec.dp_noise is not None else None),
            spec,
            gen,
            extra_loss=extra,
            on_step=on_step,
            side=side,
            aux=lambda: adapter.aux_loss(model),
            regions=regions,
        )
    trained = get_state(model)
    metrics = {**metrics, **adapter.state_metrics(model, trained)}  # e.g. RM-LoRA's effective rank
    # the delta has the received shapes (a rank-r_k client returns rank-r_k factors)
    delta = {k: crop_to(trained[k], v.shape) - v for k, v in lora.items()}
    return delta, metrics, {k: trained[k] for k in private}

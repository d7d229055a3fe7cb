"""One party's local GEM step (arXiv:2506.04344): the adapter and the special tokens' embeddings
trained together on the party's own text with GEM's mixed next-token objective
(`fedtune.embedding.gem.gem_loss`), optionally with Ghost Noise Injection."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from fedtune.client.ghost_noise import ghost_noise_injected
from fedtune.client.train import TrainSpec, batch_indices, check_finite, get_lr, make_optimizer
from fedtune.embedding.gem import GEM_KEY, gem_loss
from fedtune.models.adapters import get_state, select_trainable_, set_state_
from fedtune.seeding import derive_seed, torch_generator
from fedtune.types import AdapterState


def load_gem_state_(model: Any, tokens: torch.nn.Parameter, state: AdapterState) -> None:
    """Load an embedding run's state: the adapter's tensors into `model`, the GEM vectors into `tokens`."""
    set_state_(model, {k: v for k, v in state.items() if k != GEM_KEY})
    with torch.no_grad():
        tokens.copy_(state[GEM_KEY])


def gem_state(model: Any, tokens: torch.Tensor) -> AdapterState:
    """What travels: the adapter's tensors and the GEM vectors (detached fp32 CPU copies)."""
    return {**get_state(model), GEM_KEY: tokens.detach().to("cpu", torch.float32).clone()}


def local_gem_train_(
    model: Any,
    tokens: torch.nn.Parameter,
    received: AdapterState,
    rows: list[list[int]],
    spec: TrainSpec,
    ntp_weight: float,
    seed: int,
    rnd: int,
    client_id: str,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[AdapterState, dict[str, float]]:
    """Train from `received` on `rows`; return (delta of every received tensor, metrics).
    Mutates only the adapter tensors of `model` and `tokens` (the next party overwrites them)."""
    load_gem_state_(model, tokens, received)
    params = [*select_trainable_(model, [k for k in received if k != GEM_KEY]), tokens]
    tokens.requires_grad_(True)
    opt = make_optimizer(params, spec)
    gen = torch_generator(seed, "train", rnd, client_id)  # batches and GEM's insertion points
    torch.manual_seed(derive_seed(seed, "dropout", rnd, client_id))  # LoRA dropout draws globally
    stream = batch_indices(len(rows), spec.batch_size, gen)
    total = spec.num_steps(len(rows))
    ghost: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if spec.ghost_batch is not None:
        ghost = ghost_noise_injected(
            model, spec.ghost_batch, torch_generator(seed, "ghost", rnd, client_id), spec.ghost_eps, spec.ghost_last
        )
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    with ghost:
        for step in range(total):
            for g in opt.param_groups:
                g["lr"] = get_lr(step, total, spec)
            step_loss = 0.0
            for _ in range(spec.grad_accum):
                batch = [rows[i] for i in next(stream).tolist()]
                loss = gem_loss(model, batch, tokens, gen, ntp_weight, spec.bf16)
                check_finite(model, loss, step, spec)
                (loss / spec.grad_accum).backward()
                step_loss += loss.item() / spec.grad_accum
            if spec.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if on_step is not None:
                on_step(step + 1, total, step_loss)
    model.eval()
    tokens.requires_grad_(False)
    trained = gem_state(model, tokens)
    delta = {k: trained[k] - v for k, v in received.items()}
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "train_last_loss": losses[-1],
        "steps": float(total),
        "train_seconds": time.perf_counter() - t0,
    }
    return delta, metrics

"""Local training on one client: a plain loop (AdamW or SGD, LR schedule, accumulation,
clipping, bf16), with DP-SGD (`client.dp_sgd`, when `dp_noise` is set) and SAM (`client.sam`,
when `sam_rho` > 0) as step options, the adapter's auxiliary loss in every forward pass, and a
second parameter group on its own alternating schedule (CoMiGS's routers).
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.client.device import autocast as autocast
from fedtune.client.device import model_device as model_device
from fedtune.client.dp_sgd import Mechanism, Units, dp_step_
from fedtune.client.packing import pack_rows
from fedtune.client.sam import sam_perturb_, sam_restore_
from fedtune.errors import TrainingDivergedError
from fedtune.privacy.randomness import SecureNoise, SeededNoise


@dataclass(frozen=True)
class SideGroup:
    """Adapter parameters on their own schedule (an adapter's `ParamGroup` with `every`; CoMiGS's
    routers): with every > 0, after every every-th step of the main parameters (counted over the
    client's whole training), `steps` steps of their own AdamW at `lr`; every = 0: they train
    jointly with the main parameters."""

    params: list[torch.nn.Parameter]
    lr: float
    every: int = 0
    steps: int = 1
    name: str = "side"  # its steps' mean loss is recorded as <name>_loss
    data: TrainData | None = None  # its own rows (CoMiGS: the validation split); None = the main rows
    offset: int = 0  # steps of the main parameters in the client's earlier rounds (the schedule's count)


@dataclass(frozen=True)
class TrainData:
    """The rows a local step trains on: blocks [N, T]; `mask` [N, T] the target tokens of each
    block (instruction data: the completions; padding of DP-SGD's unit 'document' blocks is never a
    target), None = every token; `docs` [N] (DP-SGD's unit 'document') the document of each block:
    documents, not blocks, are Poisson-sampled and clipped (all blocks of a document together)."""

    blocks: torch.Tensor
    mask: torch.Tensor | None = None
    docs: torch.Tensor | None = None


@dataclass(frozen=True)
class TrainSpec:
    """Hyperparameters of local training (built from the config's `train` section)."""

    steps: int = 10
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    prox_mu: float = 0.0
    sam_rho: float = 0.0  # SAM's radius (`client.sam`); 0 = plain steps
    optimizer: str = "adamw"  # or "sgd" (no momentum)
    # sample-level DP-SGD (None = off): per-example clip C and noise multiplier sigma
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_randomness: str = "seeded"  # 'secure': Poisson batches and noise from the OS CSPRNG
    ghost_batch: int | None = None  # Ghost Noise Injection's ghost batch size (None = off)
    ghost_eps: float = 1e-3
    ghost_last: int | None = None  # only the last k norm modules (None = every one)
    packing: bool = False  # padding-free packing of a batch's examples (`client.packing`)

    def __post_init__(self) -> None:
        if not isinstance(self.bf16, bool):  # 'auto' is truthy: it would turn autocast on everywhere
            raise TypeError(
                f"TrainSpec.bf16 = {self.bf16!r}: resolve train.bf16 for the device first "
                "(engines.federation.run_precision) and pass True or False"
            )

    def dp_rate(self, num_blocks: int) -> float:
        """DP-SGD's Poisson sampling rate q for a client with `num_blocks` training blocks."""
        return min(1.0, self.batch_size * self.grad_accum / max(1, num_blocks))

    def num_steps(self, num_blocks: int) -> int:
        if self.epochs is None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * num_blocks / per_step))


def get_lr(step: int, total: int, spec: TrainSpec) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "constant" or total <= spec.warmup_steps:
        return spec.lr
    progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    if spec.lr_schedule == "linear":
        return spec.lr * (1.0 - progress)
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def batch_indices(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of batch indices: a fresh permutation per epoch (batches wrap epochs)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def trim_padding(batch: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns where no row has a target: with right padding and causal attention
    nothing before them depends on them, so the loss is unchanged and the step is cheaper."""
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    keep = int(cols.max()) + 1 if cols.numel() else 1
    return batch[:, :keep], mask[:, :keep]


def _keeps_logits_subset(model: Any) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes `logits_to_keep` (HF causal LMs since 4.50)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base).forward)


@functools.cache
def _forward_takes_logits_to_keep(forward: Callable[..., Any]) -> bool:  # once per model class, not per step
    return "logits_to_keep" in inspect.signature(forward).parameters


def target_loss(
    model: Any, batch: torch.Tensor, mask: torch.Tensor, bf16: bool, pack: bool = False
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the `mask`ed targets of right-padded rows [B, T], and
    their count. The LM head and the softmax run only at the positions that predict a target: on
    instruction data a few answer tokens follow a long prompt, and the head (vocab x hidden) is
    about a fifth of a small model's FLOPs. Same value as HF's loss (logits upcast to fp32).
    `pack`: the rows' examples run packed end to end in fewer rows (`client.packing`)."""
    dev = model_device(model)
    batch, mask = trim_padding(batch.to(dev), mask.to(dev))
    extra: dict[str, Any] = {}
    packed = pack_rows(batch, mask) if pack else None
    if packed is not None:  # no cache: transformers reads packed positions only without one
        batch, mask, extra["position_ids"] = packed.ids, packed.mask, packed.positions
        extra["use_cache"] = False
    targets = mask[:, 1:]  # position t predicts token t + 1
    n = int(targets.sum())
    if n == 0:
        return torch.zeros((), device=dev, requires_grad=torch.is_grad_enabled()), 0
    cols = torch.nonzero(targets.any(dim=0)).flatten()
    labels = batch[:, 1:][:, cols].masked_fill(~targets[:, cols], -100)
    with autocast(bf16, dev, model):
        if _keeps_logits_subset(model):
            logits = model(input_ids=batch, logits_to_keep=cols, **extra).logits
        else:
            logits = model(input_ids=batch, **extra).logits[:, cols]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, n


AuxLoss = Callable[[], "torch.Tensor | None"]


def lm_loss(
    model: Any,
    batch: torch.Tensor,
    bf16: bool,
    aux: AuxLoss | None = None,
    mask: torch.Tensor | None = None,
    pack: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of packed blocks [B, T] plus the adapter's
    auxiliary loss of that forward pass (`aux()`: e.g. a mixture's weighted load-balancing loss,
    None for none); `mask` [B, T]: only True tokens are targets; `pack`: see `target_loss`."""
    if mask is not None:
        total, n = target_loss(model, batch, mask, bf16, pack)
        loss = total / max(1, n)
    else:
        dev = model_device(model)
        batch = batch.to(dev)
        with autocast(bf16, dev, model):
            loss = model(input_ids=batch, labels=batch).loss
    extra = aux() if aux is not None else None
    if extra is not None:
        loss = loss + extra
    return torch.as_tensor(loss)


def proximal_term(
    params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float
) -> Callable[[], torch.Tensor]:
    """FedProx (arXiv:1812.06127): mu/2 * ||w - w_received||^2 keeps local steps near the global model."""

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))  # type: ignore[return-value]

    return term


@dataclass(frozen=True)
class Batches:
    """Where a step's rows come from: blocks [N, T], their target mask, an endless index stream."""

    blocks: torch.Tensor
    mask: torch.Tensor | None
    stream: Iterator[torch.Tensor]


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def check_finite(model: Any, loss: torch.Tensor, step: int, spec: TrainSpec, clip_hint: bool = True) -> None:
    """Raise TrainingDivergedError (model back in eval mode) on a NaN or infinite loss."""
    if torch.isfinite(loss):
        return
    model.eval()
    hint = " or set train.max_grad_norm" if clip_hint else ""
    raise TrainingDivergedError(f"loss is {loss.item()} at local step {step}; lower train.lr (now {spec.lr:g}){hint}")


def accumulated_step_(
    model: Any,
    optimizer: torch.optim.Optimizer,
    group: list[torch.nn.Parameter],
    data: Batches,
    spec: TrainSpec,
    step: int,
    aux: AuxLoss | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> float:
    """One optimizer step on `group` over spec.grad_accum micro-batches of `data` (norm clipped
    to spec.max_grad_norm); returns the step's mean loss. With spec.sam_rho > 0 the gradient is
    SAM's, taken at w + rho g / ||g|| on the same micro-batches (`client.sam`); the loss is the
    one at w. `step` only labels a divergence."""
    rows = [next(data.stream) for _ in range(spec.grad_accum)]
    step_loss = accumulate_grads_(model, data, rows, spec, step, aux, extra_loss)
    if spec.sam_rho > 0:
        perturbations = sam_perturb_(group, spec.sam_rho)
        optimizer.zero_grad(set_to_none=True)
        accumulate_grads_(model, data, rows, spec, step, aux, extra_loss)
        sam_restore_(group, perturbations)
    if spec.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(group, spec.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def accumulate_grads_(
    model: Any,
    data: Batches,
    rows: list[torch.Tensor],
    spec: TrainSpec,
    step: int,
    aux: AuxLoss | None,
    extra_loss: Callable[[], torch.Tensor] | None,
) -> float:
    """Backward of the mean loss over the micro-batches `rows` of `data` (into .grad); their mean loss."""
    step_loss = 0.0
    for part_rows in rows:
        part = data.mask[part_rows] if data.mask is not None else None
        loss = lm_loss(model, data.blocks[part_rows], spec.bf16, aux, part, spec.packing)
        if extra_loss is not None:
            loss = loss + extra_loss()
        check_finite(model, loss, step, spec)
        (loss / len(rows)).backward()
        step_loss += loss.item() / len(rows)
    return step_loss


def only_trains_(on: list[torch.nn.Parameter], off: list[torch.nn.Parameter]) -> None:
    for p in off:
        p.requires_grad_(False)
    for p in on:
        p.requires_grad_(True)


def local_train_(
    model: Any,
    params: list[torch.nn.Parameter],
    data: TrainData,
    spec: TrainSpec,
    gen: torch.Generator,
    *,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    side: SideGroup | None = None,
    aux: AuxLoss | None = None,
    regions: list[torch.Size] | None = None,
) -> dict[str, float]:
    """Train `params` of `model` in place on `data`; return train metrics.

    `extra_loss` adds a term to every micro-batch loss (e.g. a FedProx proximal term).
    `side` (mixture-of-experts routers): with side.every > 0 they follow CoMiGS's alternating
    schedule: after every every-th step of `params` (counted over the client's whole training,
    from `side.offset`), side.steps steps of their own AdamW on `side.data` with the same loss;
    otherwise they train jointly with `params`. `aux` adds the adapter's auxiliary loss of each
    forward pass (a mixture's load balancing). `regions`: for each of `params`, the leading
    sub-shape the client really trains (its own rank inside a larger padded LoRA); DP-SGD adds
    noise only there. With `spec.dp_noise` set, `data.docs` makes documents DP-SGD's units
    (`client.dp_sgd`). Raises TrainingDivergedError on a NaN or infinite loss.
    """
    blocks, mask = data.blocks, data.mask
    total = spec.num_steps(int(blocks.shape[0]))
    side = side if side is not None else SideGroup([], spec.lr)
    alternate = bool(side.params) and side.every > 0
    if alternate and spec.dp_noise is not None:  # validation refuses it (components.check_strategy)
        raise ValueError(f"the {side.name} group's own steps would run outside DP-SGD: set its every to 0")
    trained = params if alternate else params + side.params
    opt = make_optimizer(trained, spec)
    batches = Batches(blocks, mask, batch_indices(int(blocks.shape[0]), spec.batch_size, gen))
    if alternate:
        side_data = side.data if side.data is not None and side.data.blocks.shape[0] > 0 else data
        rows = int(side_data.blocks.shape[0])
        side_batches = Batches(side_data.blocks, side_data.mask, batch_indices(rows, spec.batch_size, gen))
        side_opt = torch.optim.AdamW(side.params, lr=side.lr, weight_decay=spec.weight_decay)
        only_trains_([], side.params)
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    side_losses: list[float] = []
    dp = spec.dp_noise is not None
    units = Units.of(int(blocks.shape[0]), data.docs)
    # seeded: the training generator (reproducible simulation); secure: the OS CSPRNG
    noise = SecureNoise() if spec.dp_randomness == "secure" else SeededNoise(gen)
    mech = Mechanism(spec.dp_rate(units.count), float(spec.dp_clip or 1.0), float(spec.dp_noise or 0.0))

    def unit_loss(rows: torch.Tensor | slice) -> torch.Tensor:
        loss = lm_loss(model, blocks[rows], spec.bf16, aux, mask[rows] if mask is not None else None)
        check_finite(model, loss, len(losses), spec, clip_hint=False)
        return loss

    empty = 0
    for step in range(total):
        lr = get_lr(step, total, spec)
        for g in opt.param_groups:
            g["lr"] = lr
        if dp:
            loss_or_none = dp_step_(opt, trained, units, unit_loss, mech, noise, regions, extra_loss)
            if loss_or_none is None:
                empty += 1
                if on_step is not None and losses:
                    on_step(step + 1, total, losses[-1])
                continue
            losses.append(loss_or_none)
        else:
            losses.append(accumulated_step_(model, opt, trained, batches, spec, len(losses), aux, extra_loss))
        if alternate and (side.offset + step + 1) % side.every == 0:
            only_trains_(side.params, trained)
            for _ in range(side.steps):
                side_losses.append(
                    accumulated_step_(model, side_opt, side.params, side_batches, spec, len(losses), aux, extra_loss)
                )
            only_trains_(trained, side.params)
        if on_step is not None:
            on_step(step + 1, total, losses[-1])
    only_trains_(side.params, [])
    model.eval()
    seconds = time.perf_counter() - t0
    return train_metrics(losses, {side.name: side_losses}, total, seconds, spec, units if dp else None, empty)


def train_metrics(
    losses: list[float],
    side_losses: dict[str, list[float]],
    total: int,
    seconds: float,
    spec: TrainSpec,
    units: Units | None,
    empty: int,
) -> dict[str, float]:
    """The client's training record; under DP-SGD (`units`) what the accountant needs: steps
    taken at Poisson rate q."""
    losses = losses or [float("nan")]  # DP-SGD: every Poisson batch was empty (tiny shard, tiny q)
    out = {
        "train_loss": sum(losses) / len(losses),
        "train_last_loss": losses[-1],
        "steps": float(total),
        "train_seconds": seconds,
    }
    if units is not None:
        out.update(dp_steps=float(total), dp_rate=spec.dp_rate(units.count), dp_empty_batches=float(empty))
    for name, values in side_losses.items():
        if values:
            out[f"{name}_loss"] = sum(values) / len(values)
    return out

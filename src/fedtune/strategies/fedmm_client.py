"""FedMM's client side for LLM adapters (arXiv:2110.08477): one party's local minimax round of
adversarial domain adaptation (DANN-style) between the adapter and a domain discriminator.

The discriminator is a small MLP on the model's last hidden state, mean-pooled over the prompt
tokens (the post and the question, never the answer): D(h) = w2 . relu(W1 h + b1) + b2, a logit of
"this text is from the target domain". A party's local objective is

    f_i(adapter, D) = 1[labelled] * LM loss on the answer - adv_weight * BCE(D(h), domain_i)

minimised over the adapter and maximised over D (D minimises its BCE). A gradient-reversal layer
between the pooled state and D gives both gradients from one backward pass: D descends the BCE, the
adapter gets the LM gradient minus adv_weight times the BCE gradient. Each party holds one domain
only (labelled parties: source, unlabelled: target), so no party's local game is the global one:
exactly the heterogeneity FedMM's correction terms address.

Unlabelled parties never see their labels: the answer tokens of their rows are overwritten before
the forward pass (and their LM loss is not computed), and the pooling stops before the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.client.run import STRATEGY_PRIVATE
from fedtune.client.train import autocast, batch_indices, get_lr, model_device
from fedtune.data.blocks import Shard
from fedtune.errors import FedtuneError
from fedtune.models.adapters import get_state, select_trainable_, set_state_, trainable_keys
from fedtune.seeding import derive_seed, torch_generator
from fedtune.strategies.minimax import dual_ascent, message
from fedtune.types import AdapterState

DISC = "fedmm.disc."  # the discriminator's tensors in the server's message and the clients' updates
DUAL = STRATEGY_PRIVATE + "fedmm.dual/"  # a client's dual variables (client-private, never loaded into the model)
DISC_KEYS = ("w1", "b1", "w2", "b2")


def init_discriminator(hidden_size: int, width: int, seed: int) -> AdapterState:
    """Seeded MLP hidden_size -> width -> 1 (fan-in scaled normal weights, zero biases)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "fedmm-disc"))
    w1 = torch.randn(width, hidden_size, generator=gen) / math.sqrt(hidden_size)
    w2 = torch.randn(1, width, generator=gen) / math.sqrt(width)
    return {DISC + "w1": w1, DISC + "b1": torch.zeros(width), DISC + "w2": w2, DISC + "b2": torch.zeros(1)}


def discriminate(disc: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Domain logits [B] of pooled states h [B, H]."""
    z = F.relu(h @ disc[DISC + "w1"].T + disc[DISC + "b1"])
    return (z @ disc[DISC + "w2"].T + disc[DISC + "b2"]).squeeze(-1)


class _Reverse(torch.autograd.Function):
    """Identity forward, gradient times -scale backward (Ganin & Lempitsky, arXiv:1409.7495)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    out: torch.Tensor = _Reverse.apply(x, scale)  # type: ignore[no-untyped-call]
    return out


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] True before each row's first target token (the prompt of a right-padded example)."""
    if bool((~mask.any(dim=1)).any()) or bool(mask[:, 0].any()):
        raise FedtuneError(
            "FedMM needs instruction data whose loss is on the completion (every row a prompt, then an "
            "answer): set data.loss_on: completion and use an instruction / chat source"
        )
    first = mask.float().argmax(dim=1, keepdim=True)  # [B, 1]
    return torch.arange(mask.shape[1]).unsqueeze(0) < first


def hide_answers(batch: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """An unlabelled party's rows with every token from the answer on replaced by token 0."""
    return batch.masked_fill(~prompt, 0)


def forward_losses(
    model: Any,
    disc: Mapping[str, torch.Tensor],
    batch: torch.Tensor,
    mask: torch.Tensor,
    labelled: bool,
    adv_weight: float,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(objective to backpropagate, LM loss or None, discriminator BCE, domain logits) of one batch.
    The objective's gradient is the party's GDA field: LM - adv_weight * BCE for the adapter
    (through the reversal layer), BCE for the discriminator."""
    dev = model_device(model)
    prompt = prompt_positions(mask)
    batch = batch if labelled else hide_answers(batch, prompt)
    keep = int(torch.nonzero((mask if labelled else prompt).any(dim=0)).max()) + 1  # right padding: drop the tail
    batch, mask, prompt = batch[:, :keep].to(dev), mask[:, :keep].to(dev), prompt[:, :keep].to(dev)
    with autocast(bf16, dev, model):
        out = model(input_ids=batch, output_hidden_states=bool(disc))
    if disc:
        h = out.hidden_states[-1].float()  # [B, T, H]
        w = prompt.float().unsqueeze(-1)
        pooled = (h * w).sum(dim=1) / w.sum(dim=1)  # [B, H]
        logits = discriminate(disc, reverse_gradient(pooled, adv_weight))
        domain = torch.full_like(logits, 0.0 if labelled else 1.0)
        bce = F.binary_cross_entropy_with_logits(logits, domain)
    else:  # no discriminator (source-only FedAvg): the LM loss alone
        logits, bce = torch.zeros(batch.shape[0], device=dev), torch.zeros((), device=dev)
    if not labelled:
        return bce, None, bce, logits
    targets = mask[:, 1:]
    labels = batch[:, 1:].masked_fill(~targets, -100)
    lm = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return lm + bce, lm, bce, logits


def _optimizer(groups: list[list[torch.Tensor]], spec: Any) -> torch.optim.Optimizer:
    """The run's local optimizer (train.optimizer; 'sgd' is the paper's plain gradient step) with
    two parameter groups: the adapter, then the discriminator (its own learning rate)."""
    param_groups = [{"params": g} for g in groups]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(param_groups, lr=spec.lr, weight_decay=spec.weight_decay)


def adversarial_round(
    model: Any,
    received: AdapterState,
    private: AdapterState,
    shard: Shard,
    spec: Any,
    seed: int,
    rnd: int,
    on_step: Callable[[int, int, float], None] | None,
    *,
    labelled: bool,
    method: str,
    mu: float,
    mu_t: float,
    adv_weight: float,
    disc_lr: float | None,
) -> tuple[AdapterState, dict[str, float], AdapterState]:
    """One party's round: (update, metrics, new private state). The update is z_i - v_bar with
    FedMM's message z_i = v_i + lam_i / mu_t ('fedmm') or v_i - v_bar (local GDA, 'gda'); v covers
    the trainable adapter tensors and the discriminator. `private` holds the party's duals."""
    t0 = time.perf_counter()
    if shard.train_mask is None:
        raise FedtuneError("FedMM needs instruction data (a loss mask on the answers): use an -instruct source")
    adapter_in = {k: v for k, v in received.items() if not k.startswith(DISC)}
    set_state_(model, adapter_in)
    keys = trainable_keys(adapter_in)
    params = dict(zip(keys, select_trainable_(model, keys)))
    dev = model_device(model)
    disc = {k: v.detach().to(dev).clone().requires_grad_(True) for k, v in received.items() if k.startswith(DISC)}
    anchor = {**{k: adapter_in[k] for k in keys}, **{k: received[k] for k in disc}}  # v_bar, on the host
    dual = {k[len(DUAL) :]: v for k, v in private.items() if k.startswith(DUAL)} if method == "fedmm" else {}
    opt = _optimizer([list(params.values()), list(disc.values())], spec)
    gen = torch_generator(seed, "train", rnd, shard.client_id)
    torch.manual_seed(derive_seed(seed, "dropout", rnd, shard.client_id))
    stream = batch_indices(int(shard.train.shape[0]), spec.batch_size, gen)
    tensors = {**params, **disc}
    anchors_dev = {k: anchor[k].to(dev) for k in tensors}
    duals_dev = {k: v.to(dev) for k, v in dual.items()}
    total = spec.num_steps(int(shard.train.shape[0]))
    lm_losses, bces, hits, seen = [], [], 0, 0
    model.train()
    for step in range(total):
        lr = get_lr(step, total, spec)
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[1]["lr"] = lr * (disc_lr / spec.lr if disc_lr is not None else 1.0)
        for _ in range(spec.grad_accum):
            rows = next(stream)
            obj, lm, bce, logits = forward_losses(
                model, disc, shard.train[rows], shard.train_mask[rows], labelled, adv_weight, spec.bf16
            )
            if not torch.isfinite(obj):
                model.eval()
                raise FedtuneError(f"FedMM: loss is {obj.item()} at local step {step}; lower train.lr")
            (obj / spec.grad_accum).backward()
            bces.append(bce.item())
            if lm is not None:
                lm_losses.append(lm.item())
            hits += int(((logits > 0) == (not labelled)).sum())
            seen += int(logits.numel())
        if spec.max_grad_norm is not None:  # the raw field is clipped; the correction terms are exact
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), spec.max_grad_norm)
        if method == "fedmm":
            with torch.no_grad():
                for k, p in tensors.items():
                    if p.grad is not None:  # F_i(v) + lam_i + mu * (v - v_bar)
                        p.grad.add_(mu * (p - anchors_dev[k]))
                        if k in duals_dev:
                            p.grad.add_(duals_dev[k])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, total, lm_losses[-1] if lm_losses else bces[-1])
    model.eval()
    trained = get_state(model)
    v = {**{k: trained[k] for k in keys}, **{k: t.detach().cpu() for k, t in disc.items()}}
    new_private: AdapterState = {}
    if method == "fedmm":
        new_dual = dual_ascent(dual, v, anchor, mu)
        z = message(v, new_dual, mu_t)
        new_private = {DUAL + k: t for k, t in new_dual.items()}
        dual_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in new_dual.values()))
    else:
        z, dual_norm = v, 0.0
    metrics = {"steps": float(total), "train_seconds": time.perf_counter() - t0}
    if disc:
        metrics.update(disc_loss=sum(bces) / len(bces), domain_acc=hits / max(1, seen), dual_norm=dual_norm)
    if lm_losses:
        metrics.update(train_loss=sum(lm_losses) / len(lm_losses), train_last_loss=lm_losses[-1])
    return {k: z[k] - anchor[k] for k in z}, metrics, new_private

"""One step of sample-level DP-SGD (Abadi et al., arXiv:1607.00133), a step option of local training:

    batch:  each unit (a training block, or a document: all its blocks) joins with probability
            q = batch_size * grad_accum / N (Poisson)
    clip:   g_i <- g_i * min(1, C / ||g_i||) per unit (all trained adapter parameters as one vector)
    noise:  g = (sum_i g_i + N(0, (sigma C)^2 I)) / (q N), then the optimizer step (AdamW or SGD;
            any optimizer is post-processing)

Per-example gradients come from one backward per example: exact for any adapter (Opacus's
per-sample hooks cover nn.Linear, so PEFT LoRA, but not the mixture-of-experts ParameterLists or
LoRA-SB's bare R), no extra dependency, and on CPU at these batch sizes about as fast as a batched
backward. Each step is a Poisson-subsampled Gaussian mechanism with rate q and multiplier sigma;
the recipe composes a client's steps over its rounds with an RDP accountant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedtune.privacy.randomness import Noise


@dataclass(frozen=True)
class Units:
    """DP-SGD's unit of privacy over N blocks: each block, or each document (`members[d]`: the
    blocks of document d, from each block's document id)."""

    count: int
    members: list[torch.Tensor] | None = None

    @staticmethod
    def of(num_blocks: int, docs: torch.Tensor | None) -> Units:
        if docs is None or not docs.numel():
            return Units(num_blocks)
        members = [torch.nonzero(docs == d).flatten() for d in range(int(docs.max()) + 1)]
        return Units(len(members), members)

    def rows(self, i: int) -> torch.Tensor | slice:
        return self.members[i] if self.members is not None else slice(i, i + 1)


@dataclass(frozen=True)
class Mechanism:
    """The Gaussian mechanism of a step: sampling rate q, clip C, noise multiplier sigma."""

    q: float
    clip: float
    sigma: float


def dp_step_(
    optimizer: torch.optim.Optimizer,
    group: list[torch.nn.Parameter],
    units: Units,
    loss_of: Callable[[torch.Tensor | slice], torch.Tensor],
    mech: Mechanism,
    noise: Noise,
    regions: list[torch.Size] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> float | None:
    """One DP-SGD step on `group` (module docstring): `loss_of(rows)` is a unit's loss (raising on
    a non-finite one); noise goes only to each parameter's `regions[i]` (a rank-r_k client inside
    a padded LoRA); `extra_loss` (FedProx) is data-independent, so added unclipped at no privacy
    cost. Returns the mean per-unit loss, None for an empty batch."""
    n = units.count
    picked = torch.nonzero(noise.uniform(n) < mech.q).flatten().tolist()
    summed = [torch.zeros_like(p, dtype=torch.float32) for p in group]
    step_losses = []
    for i in picked:
        loss = loss_of(units.rows(i))
        raw = torch.autograd.grad(loss, group, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(group, raw)]
        gnorm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        factor = min(1.0, mech.clip / gnorm) if gnorm > 0 else 1.0
        for acc, g in zip(summed, grads):
            acc.add_(g, alpha=factor)
        step_losses.append(loss.item())
    for i, (p, acc) in enumerate(zip(group, summed)):
        region = regions[i] if regions is not None and i < len(regions) else acc.shape
        cut = tuple(slice(0, k) for k in region)
        acc[cut] += noise.normal(acc[cut].shape).to(acc.device) * (mech.sigma * mech.clip)
        p.grad = (acc / (mech.q * n)).to(p.dtype)
    if extra_loss is not None:
        extra_loss().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(step_losses) / len(step_losses) if step_losses else None

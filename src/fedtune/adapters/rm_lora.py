"""RM-LoRA: regularized and masked LoRA (Mao et al., arXiv:2407.12074).

The update is LoRA's, at LoRA's parameter count (PEFT's layers, keys, export and algebra):

    dW = s * B @ A,   A: [r, k],  B: [d, r],  s = alpha / r

Training adds two things that raise the intrinsic dimension of dW (the paper ties LoRA's
approximation error to the r-th singular value of the weight discrepancy, so an update whose r
directions do not collapse onto a few uses its rank):

1. an orthogonality-promoting regulariser, added to the loss (`aux_loss`), per LoRA module

       R(A, B) = || A A^T - diag(A A^T) ||_F^2 + || B^T B - diag(B^T B) ||_F^2,

   summed over modules and weighted by `reg_weight`: the rows of A and the columns of B are
   pushed apart, so dW = sum_i b_i a_i^T keeps r distinct directions;
2. gradient masking: in every backward pass each entry of the gradient of A and B is zeroed with
   probability `mask_prob` (a fresh Bernoulli mask per pass, drawn from the global torch RNG,
   which the client round seeds from (seed, round, client) as it does for LoRA dropout; no
   rescaling). A tensor hook registered at injection does it: the training loop knows nothing.

Not retrieved: the paper's exact regulariser (the sources reachable here say only
"orthogonality-promoting"; ||AA^T - I|| + ||B^T B - I|| would pull the zero-initialised B to unit
columns at once, so the off-diagonal form above, which leaves norms to the task loss, is this
project's choice), its mask probability and whether masked gradients are rescaled.

The mechanism is logged: `state_metrics` gives `adapter_effective_rank`, the mean over modules of
the entropy effective rank (Roy & Vetterli 2007) of s * B @ A,

    erank(M) = exp(-sum_i p_i log p_i),   p_i = sigma_i / sum_j sigma_j   (0 for M = 0),

computed from the r x r core of the factors (dW = Q_B R_B R_A^T Q_A^T, so dW's singular values are
R_B R_A^T's). Each client reports its trained adapter's, and the round record their mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedtune.adapters.base import ADAPTERS, KIND_MARK, Algebra, InjectContext
from fedtune.adapters.lora import LoRA, inject_, lora_config
from fedtune.config.adapters import RMLoraAdapterConfig
from fedtune.types import AdapterState

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def off_diagonal_sq(gram: torch.Tensor) -> torch.Tensor:
    """|| G - diag(G) ||_F^2 of a square Gram matrix."""
    return (gram.pow(2).sum() - gram.diagonal().pow(2).sum()).clamp_min(0.0)


def orthogonality_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R(A, B) for A [r, k], B [d, r] (module docstring)."""
    a, b = a.float(), b.float()
    return off_diagonal_sq(a @ a.T) + off_diagonal_sq(b.T @ b)


def effective_rank(sv: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values `sv` (0.0 when they are all 0)."""
    sv = sv.double().clamp_min(0.0)
    total = float(sv.sum())
    if total <= 0.0:
        return 0.0
    p = sv[sv > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def update_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of s * B @ A without forming the [d, k] product: those of R_B R_A^T."""
    _, rb = torch.linalg.qr(b.double())  # [r, r]
    _, ra = torch.linalg.qr(a.double().T)  # [r, r]
    return torch.as_tensor(torch.linalg.svdvals(scale * rb @ ra.T))


def mean_effective_rank(state: Mapping[str, torch.Tensor], scale: float) -> float | None:
    """The mean over LoRA modules of erank(s * B @ A) (None: no LoRA factors in `state`)."""
    ranks = [
        effective_rank(update_singular_values(state[k], state[k[: -len(A_SUFFIX)] + B_SUFFIX], scale))
        for k in sorted(state)
        if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in state
    ]
    return sum(ranks) / len(ranks) if ranks else None


def mask_gradient(grad: torch.Tensor, prob: float) -> torch.Tensor:
    """`grad` with each entry zeroed with probability `prob` (the global RNG on grad's device)."""
    keep = torch.rand(grad.shape, device=grad.device) >= prob
    return grad * keep.to(grad.dtype)


def add_gradient_masks_(model: Any, prob: float) -> None:
    """Register the masking hook on every LoRA factor of `model` (nothing for prob = 0)."""
    if prob <= 0.0:
        return
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.register_hook(lambda g: mask_gradient(g, prob))


def lora_factors(model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every PEFT LoRA module of `model` (adapter 'default')."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in model.modules():
        a, b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(a, torch.nn.ModuleDict) and "default" in a and isinstance(b, torch.nn.ModuleDict):
            out.append((torch.as_tensor(a["default"].weight), torch.as_tensor(b["default"].weight)))
    return out


@ADAPTERS.register("rm_lora", "RM-LoRA: LoRA + orthogonality regulariser + gradient masking (arXiv:2407.12074).")
@dataclass(frozen=True)
class RMLoRA(LoRA):
    """Regularized and masked LoRA (arXiv:2407.12074): module docstring."""

    options: RMLoraAdapterConfig = field(default_factory=RMLoraAdapterConfig)  # type: ignore[assignment]

    kind: ClassVar[str] = "rm_lora"
    algebra: ClassVar[Algebra] = Algebra.LORA_PRODUCT

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        model = inject_(model, lora_config(self.options, ctx.model_type, r=ctx.r_max), ctx.seed)
        add_gradient_masks_(model, self.options.mask_prob)
        model.__dict__[KIND_MARK] = "rm_lora"
        return model

    def aux_loss(self, model: Any) -> torch.Tensor | None:
        """reg_weight * sum over LoRA modules of R(A, B) (it does not depend on the batch)."""
        if self.options.reg_weight <= 0:
            return None
        terms = [orthogonality_penalty(a, b) for a, b in lora_factors(model)]
        return self.options.reg_weight * torch.stack(terms).sum() if terms else None

    def state_metrics(self, model: Any, state: AdapterState) -> dict[str, float]:
        """The mean entropy effective rank of s * B @ A over modules (module docstring)."""
        erank = mean_effective_rank(state, self.scale(model))
        return {} if erank is None else {"adapter_effective_rank": erank}

"""LoRA-FAIR (Bian et al., ICCV 2025, arXiv:2411.14961): server-side residual correction dB.

Clients train A and B from the server's (A_bar, B_bar') (no re-initialisation). The server
averages A and B, then corrects B so that (B_bar + dB) A_bar is close to the exact target
dW = sum_k p_k B_k A_k. Objective implemented here (the paper's similarity term is cosine-type;
both choices are offered):

    cosine:     min_dB  1 - cos(vec dW, vec((B_bar + dB) A_bar)) + lam * ||dB||_F^2
    frobenius:  min_dB  ||dW - (B_bar + dB) A_bar||_F^2 / ||dW||_F^2 + lam * ||dB||_F^2

solved per module with `steps` Adam steps (lr `server_lr`) from dB = 0. Same bytes as FedIT;
not exact (a residual outside A_bar's row space cannot be corrected through B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune.strategies.base import (
    EXACT_LORA,
    STRATEGIES,
    Capabilities,
    Combined,
    GlobalModel,
    example_weights,
    weighted_mean,
)
from fedtune.strategies.lora_math import A_SUFFIX, B_SUFFIX, relative_error
from fedtune.strategies.merge import weighted_products
from fedtune.strategies.params import NonNegative, NonNegativeCount, Positive
from fedtune.types import ClientUpdate, add_states


def fair_correction(
    target: torch.Tensor, a_bar: torch.Tensor, b_bar: torch.Tensor, objective: str, lam: float, steps: int, lr: float
) -> torch.Tensor:
    """dB minimising the objective above (target = sum_k p_k B_k A_k, unscaled)."""
    db = torch.zeros_like(b_bar, requires_grad=True)
    opt = torch.optim.Adam([db], lr=lr)
    t = target.float()
    tn = t.norm().clamp_min(1e-12)
    for _ in range(steps):
        approx = (b_bar + db) @ a_bar
        if objective == "cosine":
            sim = 1 - (approx * t).sum() / (approx.norm().clamp_min(1e-12) * tn)
        else:
            sim = (t - approx).pow(2).sum() / tn**2
        loss = sim + lam * db.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return db.detach()


@STRATEGIES.register("lora_fair")
@dataclass(frozen=True)
class LoRAFAIR(GlobalModel):
    """LoRA-FAIR (arXiv:2411.14961): FedIT plus a server correction dB so that (B_bar + dB) A_bar
    approaches sum_k p_k B_k A_k; no extra bytes. Objective and solver in the module docstring."""

    objective: Literal["cosine", "frobenius"] = "cosine"
    lam: NonNegative = 0.01
    steps: NonNegativeCount = 50
    server_lr: Positive = 1e-3

    capabilities = Capabilities(algebras=EXACT_LORA)

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        glob = state["global"]
        p = example_weights(updates)
        clients = [add_states(glob, u.delta) for u in updates]
        new = weighted_mean(clients, p)
        targets = weighted_products(clients, p, 1.0)
        before = relative_error(
            {m: t.double() for m, t in targets.items()},
            {m: new[m + B_SUFFIX].double() @ new[m + A_SUFFIX].double() for m in targets},
        )
        for m, t in targets.items():
            new[m + B_SUFFIX] = new[m + B_SUFFIX] + fair_correction(
                t, new[m + A_SUFFIX], new[m + B_SUFFIX], self.objective, self.lam, self.steps, self.server_lr
            )
        after = relative_error(
            {m: t.double() for m, t in targets.items()},
            {m: new[m + B_SUFFIX].double() @ new[m + A_SUFFIX].double() for m in targets},
        )
        return new, {}, {"agg_error_fedit": before, "agg_error": after}

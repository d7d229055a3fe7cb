"""LoRA-SB adapter (Ponkshe et al., arXiv:2411.19557; used by Fed-SB, arXiv:2502.15436).

    dW = s * B @ R @ A,   B: [d, r] and A: [r, k] frozen and shared by all clients, R: [r, r] trained.

B and A come from a truncated SVD of the full-weight gradient G of each target module, estimated
on data the server may see (a public/proxy corpus or one consenting client's validation split):
G ~ U S V^T, B = U[:, :r], A = V^T[:r], R_0 = -init_lr * diag(S[:r]) (so B R_0 A approximates one
full fine-tuning SGD step of size init_lr, as LoRA-SB's initialisation intends). s = 1 (alpha = r).

The init is deterministic from (base model, init data, seed), so every party computes the same
A and B locally and only R (4 r^2 bytes per module in fp32) ever travels.
State keys: `<module>.lora_sb_A`, `.lora_sb_B` (frozen, never trained or sent back) and `.lora_sb_R`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.adapters.base import ADAPTERS, KIND_MARK, AdapterBase, Algebra, EngineNeed, InjectContext, adapter_input
from fedtune.config.adapters import LoraSBAdapterConfig
from fedtune.errors import ConfigError, Problem
from fedtune.types import AdapterState

SB_A, SB_B, SB_R = ".lora_sb_A", ".lora_sb_B", ".lora_sb_R"
FROZEN_SUFFIXES = (SB_A, SB_B)


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A linear (or GPT-2 Conv1D) layer's weight, typed."""
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    return w


class LoraSBLinear(nn.Module):
    """base(x) + ((x A^T) R^T) B^T around a frozen nn.Linear or GPT-2 Conv1D."""

    def __init__(self, base_layer: nn.Module, r: int):
        super().__init__()
        self.base_layer = base_layer
        w = weight_of(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"  # Conv1D stores [in, out]
        d, k = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else (w.shape[0], w.shape[1])
        self.lora_sb_A = nn.Parameter(torch.zeros(r, k), requires_grad=False)
        self.lora_sb_B = nn.Parameter(torch.zeros(d, r), requires_grad=False)
        self.lora_sb_R = nn.Parameter(torch.zeros(r, r))

    def dense_weight_shape(self) -> tuple[int, int]:
        return self.lora_sb_B.shape[0], self.lora_sb_A.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = adapter_input(x, self.lora_sb_A.dtype) @ self.lora_sb_A.T  # [.., r]
        out = torch.as_tensor(out)
        return out + ((h @ self.lora_sb_R.T) @ self.lora_sb_B.T).to(out.dtype)


def _targets(model: nn.Module, names: list[str]) -> list[str]:
    out = []
    for prefix, mod in model.named_modules():
        leaf = prefix.rsplit(".", 1)[-1]
        if leaf in names and hasattr(mod, "weight") and mod.weight is not None and mod.weight.dim() == 2:
            out.append(prefix)
    if not out:
        raise ValueError(f"no module named {names} found for the LoRA-SB adapter")
    return out


def gradient_estimate(
    model: nn.Module, prefixes: list[str], blocks: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """Mean full-weight gradient [d, k] of the LM loss for each target module over `blocks`."""
    mods = dict(model.named_modules())
    weights = [weight_of(mods[p]) for p in prefixes]
    for w in weights:
        w.requires_grad_(True)
    grads = {p: torch.zeros_like(weight_of(mods[p]), dtype=torch.float32) for p in prefixes}
    n = 0
    model.eval()
    for i in range(0, int(blocks.shape[0]), batch_size):
        batch = blocks[i : i + batch_size].to(weights[0].device)
        loss = model(input_ids=batch, labels=batch).loss
        for p, gi in zip(prefixes, torch.autograd.grad(loss, weights)):
            grads[p] += gi.float() * batch.shape[0]
        n += batch.shape[0]
    for w in weights:
        w.requires_grad_(False)
    out = {}
    for p in prefixes:
        mean = grads[p] / max(1, n)
        out[p] = mean.T if type(mods[p]).__name__ == "Conv1D" else mean  # always [out, in]
    return out


def inject_lora_sb_(
    model: nn.Module, target_names: list[str], r: int, init_blocks: torch.Tensor, init_lr: float, batch_size: int = 4
) -> nn.Module:
    """Wrap the target modules with LoRA-SB, initialised from the SVD of a gradient estimate."""
    prefixes = _targets(model, target_names)
    grads = gradient_estimate(model, prefixes, init_blocks, batch_size)
    model.requires_grad_(False)
    mods = dict(model.named_modules())
    for p in prefixes:
        parent_name, _, leaf = p.rpartition(".")
        parent = mods[parent_name] if parent_name else model
        layer = LoraSBLinear(mods[p], r).to(weight_of(mods[p]).device)  # where the base layer is
        u, s, vh = torch.linalg.svd(grads[p].double(), full_matrices=False)
        rr = min(r, s.numel())
        with torch.no_grad():
            layer.lora_sb_B[:, :rr] = u[:, :rr].float()
            layer.lora_sb_A[:rr] = vh[:rr].float()
            layer.lora_sb_R[:rr, :rr] = torch.diag(-init_lr * s[:rr]).float()
        setattr(parent, leaf, layer)
    model.__dict__[KIND_MARK] = "lora_sb"
    return model


def sb_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    out = {}
    for name, p in model.named_parameters():
        if ".lora_sb_" in name:
            out[name] = p
    return out


def sb_to_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact PEFT LoRA factors (scale 1): lora_A = R @ A, lora_B = B."""
    out = {}
    for k in state:
        if k.endswith(SB_R):
            m = k[: -len(SB_R)]
            out[m + ".lora_A.weight"] = state[m + SB_R] @ state[m + SB_A]
            out[m + ".lora_B.weight"] = state[m + SB_B].clone()
    return out


def target_names(model: nn.Module, targets: Any) -> list[str]:
    """Explicit target module names ('all-linear' = every Linear but the LM head)."""
    if not isinstance(targets, str):
        return sorted(targets)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - {"lm_head"})


_PUBLIC_FIX = "use adapter.sb_init: source:<public corpus>, e.g. source:stdlib"


@ADAPTERS.register("lora_sb", "LoRA-SB: dW = B R A, A and B shared and frozen, only R trains (Fed-SB).")
@dataclass(frozen=True)
class LoraSB(AdapterBase):
    """LoRA-SB (arXiv:2411.19557): dW = B R A, A and B shared and frozen, only R trains."""

    options: LoraSBAdapterConfig = field(default_factory=LoraSBAdapterConfig)

    kind: ClassVar[str] = "lora_sb"
    algebra: ClassVar[Algebra] = Algebra.LORA_SB
    frozen_suffixes: ClassVar[tuple[str, ...]] = FROZEN_SUFFIXES

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        from fedtune.adapters.lora import lora_config

        o = self.options
        targets = target_names(model, lora_config(o, ctx.model_type, r=ctx.r_max).target_modules)
        init_lr = o.sb_init_lr if o.sb_init_lr is not None else ctx.train_lr
        return inject_lora_sb_(model, targets, o.r, self.init_blocks(ctx), init_lr)

    def init_blocks(self, ctx: InjectContext) -> torch.Tensor:
        """Data for the gradient estimate: only what the server may see (adapter.sb_init)."""
        how, n = self.options.sb_init, self.options.sb_init_blocks
        if how.startswith("source:"):
            if ctx.public_blocks is None:
                raise ValueError("LoRA-SB's init from a public corpus needs InjectContext.public_blocks")
            return ctx.public_blocks(how.split(":", 1)[1], n)
        if ctx.shards is None:
            raise ConfigError([Problem("adapter.sb_init", how, "needs a public corpus here", "use source:<name>")])
        cid = how.split(":", 1)[1] if ":" in how else next(iter(ctx.shards))
        if cid not in ctx.shards:
            fix = f"use one of: {', '.join(ctx.shards)}"
            raise ConfigError([Problem("adapter.sb_init", how, "unknown client", fix)])
        shard = ctx.shards[cid]
        blocks: torch.Tensor = shard.val if shard.val.shape[0] > 0 else shard.train
        return blocks[:n]

    def parameters(self, model: Any) -> dict[str, nn.Parameter]:
        return sb_parameters(model)

    def scale(self, model: Any) -> float:
        return 1.0

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        """B (R A) is an ordinary PEFT LoRA of scale 1."""
        from fedtune.adapters.lora import export_peft

        config = copy.deepcopy(peft_config)
        config.lora_alpha = float(config.r)
        return export_peft(sb_to_lora(state), config, base_model, out_dir)

    def problems(self, *, dp: bool, dp_sgd: bool) -> list[Problem]:
        o, out = self.options, []
        if o.ranks is not None:
            why = "LoRA-SB shares A and B: one rank for all"
            out.append(Problem("adapter.ranks", o.ranks, why, "drop adapter.ranks"))
        if dp and not o.sb_init.startswith("source:"):
            out.append(
                Problem(
                    "adapter.sb_init",
                    o.sb_init,
                    "LoRA-SB's init from a client's data is released to everyone, outside the DP guarantee",
                    _PUBLIC_FIX,
                )
            )
        return out

    def engine_needs(self) -> list[EngineNeed]:
        if self.options.sb_init.startswith("source:"):
            return []
        why = "every party computes the LoRA-SB init itself, from public data"
        return [EngineNeed("client_data_init", "adapter.sb_init", self.options.sb_init, why, _PUBLIC_FIX)]

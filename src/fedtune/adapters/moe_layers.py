"""The layers of the mixture of LoRA experts (the maths: `adapters.moe_lora`'s docstring)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedtune.adapters.base import adapter_input
from fedtune.adapters.lora_sb import weight_of


class ExpertLoRA(nn.Module):
    """A frozen nn.Linear / GPT-2 Conv1D plus one LoRA per expert; `active` picks the expert."""

    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, scale: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        w = weight_of(base_layer)
        conv1d = type(base_layer).__name__ == "Conv1D"  # stores [in, out]
        d_out, d_in = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.moe_lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, d_in)) for _ in range(num_experts)])
        self.moe_lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, r)) for _ in range(num_experts)])
        for a in self.moe_lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's LoRA: B = 0, so the start is the base
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active is None:
            return torch.as_tensor(out)
        a, b = self.moe_lora_A[self.active], self.moe_lora_B[self.active]
        h = adapter_input(self.dropout(x), a.dtype) @ a.T
        out = torch.as_tensor(out)
        return out + torch.as_tensor(self.scale * (h @ b.T)).to(out.dtype)


class MoEBlock(nn.Module):
    """Routes each token over E expert copies of `inner` (whose linears are ExpertLoRA)."""

    def __init__(self, inner: nn.Module, hidden: int, num_experts: int, top_k: int, router: str):
        super().__init__()
        self.inner = inner
        self.num_experts, self.top_k, self.router_kind = num_experts, top_k, router
        gate = nn.Linear(hidden, num_experts, bias=False)
        nn.init.normal_(gate.weight, std=0.02)
        if router == "frozen":
            gate.weight.requires_grad_(False)
            self.moe_frozen_router = gate
        else:
            self.moe_router = gate
        self.expert_mask: torch.Tensor
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.lb_loss: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None

    @property
    def gate(self) -> nn.Linear:
        return self.moe_frozen_router if self.router_kind == "frozen" else self.moe_router

    def experts(self) -> list[ExpertLoRA]:
        return [m for m in self.inner.modules() if isinstance(m, ExpertLoRA)]

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixture weights w [.., E], load-balancing loss) for block input x [B, T, H]."""
        g = self.gate(adapter_input(x, self.gate.weight.dtype)).float()
        if self.router_kind == "sequence":  # causal prefix mean: one decision per prefix, no look-ahead
            steps = torch.arange(1, g.shape[-2] + 1, device=g.device, dtype=g.dtype)[:, None]
            g = g.cumsum(dim=-2) / steps
        g = g.masked_fill(~self.expert_mask, float("-inf"))
        active = int(self.expert_mask.sum())
        k = min(self.top_k, active)
        top = g.topk(k, dim=-1)
        w = torch.zeros_like(g).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        probs = torch.softmax(g, dim=-1).reshape(-1, g.shape[-1])
        chosen = torch.zeros_like(g).scatter(-1, top.indices, 1.0 / k).reshape(-1, g.shape[-1])
        lb = active * (chosen.mean(0) * probs.mean(0)).sum()
        self.last_probs = probs.detach()
        return w, lb

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        w, self.lb_loss = self.routing(hidden_states)
        used = [i for i in range(self.num_experts) if bool(self.expert_mask[i]) and bool((w[..., i] > 0).any())]
        layers = self.experts()
        mixed, rest = None, ()
        for i in used:
            for m in layers:
                m.active = i
            out = self.inner(hidden_states, *args, **kwargs)
            y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            term = w[..., i : i + 1].to(y.dtype) * y
            mixed = term if mixed is None else mixed + term
        for m in layers:
            m.active = None
        return (mixed, *rest) if rest else mixed

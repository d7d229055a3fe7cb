"""Top-k sparsification with error feedback (Stich et al., arXiv:1809.07599; Karimireddy et al.,
arXiv:1901.09847).

Per tensor, the sender adds its residual e to the update, sends the k = ceil(fraction * n)
largest-magnitude entries of x + e (int32 indices + fp32 values) and keeps the rest as the new
residual: e' = (x + e) - sent. Nothing is lost, only delayed: sum of everything sent + the final
residual = sum of every update. The residual is the sender's codec state (checkpointed with the
run). `error_feedback: false` drops the rest instead (biased).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.codecs.base import CODECS, is_float
from fedtune.types import AdapterState


@CODECS.register("topk")
@dataclass(frozen=True)
class TopK:
    """Top-k sparsification (largest |x| per tensor) with error feedback."""

    fraction: float = 0.01
    error_feedback: bool = True

    stateful = True

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction = {self.fraction}: use a value in (0, 1], e.g. 0.01")

    def forward(
        self, tensors: AdapterState, state: Any, rng: torch.Generator
    ) -> tuple[AdapterState, dict[str, Any], Any]:
        residual: AdapterState = dict(state or {})
        out: AdapterState = {}
        meta: dict[str, Any] = {}
        for key, v in sorted(tensors.items()):  # a fixed order for reproducible state
            if not is_float(v) or v.numel() == 0:
                out[key] = v
                continue
            x = v.float().reshape(-1)
            if self.error_feedback and key in residual:
                x = x + residual[key].reshape(-1)
            k = max(1, math.ceil(self.fraction * x.numel()))
            idx = x.abs().topk(k, sorted=False).indices.sort().values
            vals = x[idx]
            out[key + "|i"], out[key + "|v"] = idx.to(torch.int32), vals
            meta[key] = list(v.shape)
            if self.error_feedback:
                rest = x.clone()
                rest[idx] = 0.0
                residual[key] = rest.reshape(v.shape)
        return out, meta, (residual if self.error_feedback else None)

    def backward(self, tensors: AdapterState, meta: dict[str, Any], state: Any) -> tuple[AdapterState, Any]:
        out = {k: v for k, v in tensors.items() if k.rsplit("|", 1)[0] not in meta}
        for key, shape in meta.items():
            n = math.prod(shape)
            x = torch.zeros(n, dtype=torch.float32)
            x[tensors[key + "|i"].long()] = tensors[key + "|v"].float()
            out[key] = x.reshape(shape)
        return out, state

"""Uncompressed stages: fp32 as is, and fp16 (half the bytes, ~1e-3 relative error). Only
floating-point tensors are cast (indices from an earlier stage pass through)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.codecs.base import CODECS, is_float
from fedtune.types import AdapterState


@CODECS.register("identity")
@dataclass(frozen=True)
class Identity:
    """fp32 tensors as they are (safetensors)."""

    stateful = False

    def forward(
        self, tensors: AdapterState, state: Any, rng: torch.Generator
    ) -> tuple[AdapterState, dict[str, Any], Any]:
        return {k: v.to(torch.float32) if is_float(v) else v for k, v in tensors.items()}, {}, None

    def backward(self, tensors: AdapterState, meta: dict[str, Any], state: Any) -> tuple[AdapterState, Any]:
        return tensors, None


@CODECS.register("fp16")
@dataclass(frozen=True)
class Fp16:
    """Half precision on the wire; decoded back to fp32."""

    stateful = False

    def forward(
        self, tensors: AdapterState, state: Any, rng: torch.Generator
    ) -> tuple[AdapterState, dict[str, Any], Any]:
        return {k: v.to(torch.float16) if is_float(v) else v for k, v in tensors.items()}, {}, None

    def backward(self, tensors: AdapterState, meta: dict[str, Any], state: Any) -> tuple[AdapterState, Any]:
        return {k: v.to(torch.float32) if is_float(v) else v for k, v in tensors.items()}, None

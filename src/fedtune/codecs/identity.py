"""Uncompressed codecs: fp32 as is, and fp16 (half the bytes, ~1e-3 relative error)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.codecs.base import CODECS, deserialize, serialize
from fedtune.types import AdapterState


@CODECS.register("identity")
@dataclass(frozen=True)
class Identity:
    """fp32 tensors as they are (safetensors)."""

    def init_state(self) -> Any:
        return None

    def encode(self, tensors: AdapterState, state: Any, rng: torch.Generator) -> tuple[bytes, Any]:
        return serialize({k: v.to(torch.float32) for k, v in tensors.items()}), state

    def decode(self, payload: bytes, state: Any) -> tuple[AdapterState, Any]:
        return deserialize(payload), state


@CODECS.register("fp16")
@dataclass(frozen=True)
class Fp16:
    """Half precision on the wire; decoded back to fp32."""

    def init_state(self) -> Any:
        return None

    def encode(self, tensors: AdapterState, state: Any, rng: torch.Generator) -> tuple[bytes, Any]:
        return serialize({k: v.to(torch.float16) for k, v in tensors.items()}), state

    def decode(self, payload: bytes, state: Any) -> tuple[AdapterState, Any]:
        return {k: v.to(torch.float32) for k, v in deserialize(payload).items()}, state

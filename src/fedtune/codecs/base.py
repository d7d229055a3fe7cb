"""The Codec protocol and the wire format. Bytes on the wire are always counted from these payloads."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.registry import Registry
from fedtune.types import AdapterState


class Codec(Protocol):
    """Encode adapter tensors to bytes and back; codec state is a value passed in and returned."""

    def init_state(self) -> Any: ...

    def encode(self, tensors: AdapterState, state: Any, rng: torch.Generator) -> tuple[bytes, Any]: ...

    def decode(self, payload: bytes, state: Any) -> tuple[AdapterState, Any]: ...


CODECS: Registry[type] = Registry("codec")


def serialize(tensors: AdapterState, meta: dict[str, str] | None = None) -> bytes:
    """safetensors bytes (a JSON header plus raw little-endian tensors)."""
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def deserialize(payload: bytes) -> AdapterState:
    return dict(st_load(payload))

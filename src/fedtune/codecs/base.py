"""The Codec protocol, codec stages and the wire format. Bytes on the wire are always counted from
these payloads.

A codec is a chain of stages (`codec: {name: chain, stages: [{name: topk, fraction: 0.01},
{name: quantize, bits: 8}]}`; a single name is a chain of one). Each stage maps a dict of tensors
to a dict of wire tensors plus a small JSON meta (forward, on the sender) and back (backward, on
the receiver), so stages compose: top-k turns a tensor into indices and values, quantization then
packs the values. The chain serializes the last stage's tensors with safetensors; the metas travel
in its header. Stage state (error-feedback residuals, last uploads) is a value passed in and
returned; the caller keeps one per sender (each client's uplink, the server's downlink to each
client) and one per receiver for stages that decode statefully.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.registry import Registry
from fedtune.types import AdapterState

META_KEY = "fedtune-codec"


class Codec(Protocol):
    """Encode adapter tensors to bytes and back; codec state is a value passed in and returned.
    A codec is a chain of stages (`Chain`); `stages` are its steps in order."""

    @property
    def stages(self) -> tuple[Any, ...]: ...

    @property
    def stateful(self) -> bool:
        """Whether any stage keeps state between messages (error feedback)."""
        ...

    def init_state(self) -> Any: ...

    def encode(self, tensors: AdapterState, state: Any, rng: torch.Generator) -> tuple[bytes, Any]: ...

    def decode(self, payload: bytes, state: Any) -> tuple[AdapterState, Any]: ...


class Stage(Protocol):
    """One transformation of a chain. `stateful`: forward keeps sender state (decode may keep
    receiver state); a stateless stage ignores and returns None."""

    stateful: bool

    def forward(
        self, tensors: AdapterState, state: Any, rng: torch.Generator
    ) -> tuple[AdapterState, dict[str, Any], Any]: ...

    def backward(self, tensors: AdapterState, meta: dict[str, Any], state: Any) -> tuple[AdapterState, Any]: ...


CODECS: Registry[type] = Registry("codec")


def serialize(tensors: AdapterState, meta: dict[str, str] | None = None) -> bytes:
    """safetensors bytes (a JSON header plus raw little-endian tensors)."""
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def deserialize(payload: bytes) -> AdapterState:
    """Tensors in key order (safetensors' own order is not stable across loads)."""
    loaded = st_load(payload)
    return {k: loaded[k] for k in sorted(loaded)}


def header_metadata(payload: bytes) -> dict[str, str]:
    """The safetensors `__metadata__` of a payload (first 8 bytes: header length, little endian)."""
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n]).get("__metadata__", {}) or {}


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


@dataclass(frozen=True)
class Chain:
    """Stages applied in order on encode and in reverse on decode (see the module docstring)."""

    stages: tuple[Any, ...] = field(default_factory=tuple)

    @property
    def stateful(self) -> bool:
        return any(s.stateful for s in self.stages)

    def init_state(self) -> Any:
        return None

    def encode(self, tensors: AdapterState, state: Any, rng: torch.Generator) -> tuple[bytes, Any]:
        states = list(state) if state is not None else [None] * len(self.stages)
        metas = []
        out = dict(tensors)
        for i, stage in enumerate(self.stages):
            out, meta, states[i] = stage.forward(out, states[i], rng)
            metas.append(meta)
        payload = serialize(out, {META_KEY: json.dumps(metas, separators=(",", ":"))})
        return payload, (states if self.stateful else None)

    def decode(self, payload: bytes, state: Any) -> tuple[AdapterState, Any]:
        metas = json.loads(header_metadata(payload).get(META_KEY, "[]"))
        if len(metas) != len(self.stages):
            raise ValueError(f"payload was encoded by {len(metas)} codec stages, this codec has {len(self.stages)}")
        states = list(state) if state is not None else [None] * len(self.stages)
        out = deserialize(payload)
        for i in reversed(range(len(self.stages))):
            out, states[i] = self.stages[i].backward(out, metas[i], states[i])
        return out, (states if self.stateful else None)


def make_codec(name: str, **params: Any) -> Chain:
    """A codec of one registered stage, e.g. make_codec("quantize", bits=4)."""
    return Chain((CODECS.get(name)(**params),))

"""Stochastic uniform quantization to 8, 4 or 2 bits with a scale per block (QSGD-style
stochastic rounding: unbiased).

Per block of `block` values with minimum lo and maximum hi: step = (hi - lo) / (2^b - 1),
q = floor((x - lo) / step + u) with u ~ U[0, 1), so E[lo + q step] = x (unbiased) and
|lo + q step - x| < step. `stochastic: false` rounds to nearest instead (biased, error <= step/2).
On the wire: the codes packed 8/b per byte, plus lo and step as fp32 per block (64 bits per block:
0.25 bit per value at the default block of 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune.codecs.base import CODECS, is_float
from fedtune.types import AdapterState


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) -> bytes with 8/bits codes each (length a multiple of 8/bits)."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(-1, per)
    out = torch.zeros(c.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= c[:, i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * i)) & mask for i in range(per)], dim=1).reshape(-1)


def quantize(
    x: torch.Tensor, bits: int, block: int, rng: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, lo [blocks], step [blocks]) of a flat fp32 tensor; rng None = nearest."""
    n = x.numel()
    nb = -(-n // block)
    flat = torch.zeros(nb * block, dtype=torch.float32)
    flat[:n] = x.reshape(-1).float()
    if n < nb * block:  # padding repeats the last real value so it does not widen the range
        flat[n:] = flat[n - 1]
    blocks = flat.reshape(nb, block)
    lo, hi = blocks.min(dim=1).values, blocks.max(dim=1).values
    levels = (1 << bits) - 1
    step = (hi - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    u = (blocks - lo[:, None]) / safe[:, None]
    noise = torch.rand(u.shape, generator=rng) if rng is not None else torch.full_like(u, 0.5)
    codes = torch.floor(u + noise).clamp_(0, levels)
    return pack(codes.reshape(-1), bits), lo, step


def dequantize(packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    block = packed.numel() * (8 // bits) // lo.numel()
    codes = unpack(packed, bits).reshape(lo.numel(), block).float()
    return (lo[:, None] + codes * step[:, None]).reshape(-1)[:n]


@CODECS.register("quantize")
@dataclass(frozen=True)
class Quantize:
    """Stochastic uniform quantization (8/4/2 bits, a scale per block): unbiased."""

    bits: Literal[2, 4, 8] = 8
    block: int = 256
    stochastic: bool = True

    stateful = False

    def __post_init__(self) -> None:
        if self.block < 1 or self.block % 4:
            raise ValueError(f"block = {self.block}: use a positive multiple of 4 (e.g. 256)")

    def forward(
        self, tensors: AdapterState, state: Any, rng: torch.Generator
    ) -> tuple[AdapterState, dict[str, Any], Any]:
        out: AdapterState = {}
        meta: dict[str, Any] = {}
        for k, v in sorted(tensors.items()):  # a fixed order: the rng draws must not depend on it
            if not is_float(v) or v.numel() == 0:
                out[k] = v
                continue
            q, lo, step = quantize(v, self.bits, self.block, rng if self.stochastic else None)
            out[k + "|q"], out[k + "|lo"], out[k + "|step"] = q, lo, step
            meta[k] = list(v.shape)
        return out, meta, None

    def backward(self, tensors: AdapterState, meta: dict[str, Any], state: Any) -> tuple[AdapterState, Any]:
        out = {k: v for k, v in tensors.items() if k.rsplit("|", 1)[0] not in meta}
        for k, shape in meta.items():
            n = 1
            for s in shape:
                n *= s
            x = dequantize(tensors[k + "|q"], tensors[k + "|lo"], tensors[k + "|step"], self.bits, n)
            out[k] = x.reshape(shape)
        return out, None

"""AQUILA-style adaptive quantization of lazily aggregated updates (Zhao et al., arXiv:2308.00258;
LAQ: Sun et al., arXiv:1909.07588).

Each client keeps q, its last update as the server knows it; the server keeps the same q per
client (the decoder state). Each round the client quantizes only the innovation v = update - q:

    R = ||v||_inf per tensor,  grid of 2^b - 1 steps over [-R, R],  Q(v) = nearest grid point
    b = smallest bit width with  d * (step/2)^2 <= tol * ||v||^2   (quantization error at most a
        fraction `tol` of the innovation's energy; adaptive per client and round, in [1, 16])

and uploads Q(v) unless the innovation is small, the lazy rule:

    skip  if  ||Q(v)||^2 + ||v - Q(v)||^2 <= beta * ||q||^2   (at most `max_skips` rounds in a row)

A skipped upload is a header of a few dozen bytes; the server then reuses the client's stale q.
Both sides update q <- q + Q(v) on an upload, so quantization errors are corrected next round.
Adaptation: the paper's rules compare against the global model's
change ||theta^k - theta^(k-1)||^2, which a codec does not see; here the reference is the client's
own last update ||q||^2, and the bit width targets a relative error instead of the paper's
closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.codecs.base import CODECS, is_float
from fedtune.types import AdapterState


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integer codes < 2^bits -> a uint8 bit stream (any bits in 1..16)."""
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((codes.to(torch.int32)[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, torch.zeros(pad, dtype=torch.uint8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: n * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int32)
    return (stream.reshape(n, bits).to(torch.int32) * weights).sum(dim=1)


def grid(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, R, step) of nearest rounding of v onto 2^bits - 1 steps over [-R, R]."""
    r = v.abs().max()
    step = 2 * r / ((1 << bits) - 1) if float(r) > 0 else torch.tensor(1.0)
    codes = torch.round((v + r) / step).clamp_(0, (1 << bits) - 1)
    return codes, r, step


def choose_bits(vs: list[torch.Tensor], tol: float) -> int:
    """Smallest b with sum_t d_t (step_t / 2)^2 <= tol * ||v||^2 (step_t = 2 R_t / (2^b - 1))."""
    energy = sum(float(v.pow(2).sum()) for v in vs)
    if energy == 0:
        return 1
    bound = sum(v.numel() * float(v.abs().max()) ** 2 for v in vs)  # sum d_t R_t^2
    # d R^2 / (2^b - 1)^2 <= tol * energy
    return int(min(16, max(1, math.ceil(math.log2(1 + math.sqrt(bound / (tol * energy)))))))


@CODECS.register("aquila")
@dataclass(frozen=True)
class Aquila:
    """AQUILA-style lazy uploads of adaptively quantized innovations (see the module docstring)."""

    tol: float = 0.01
    beta: float = 0.05
    max_skips: int = 3

    stateful = True

    def __post_init__(self) -> None:
        if self.tol <= 0 or self.beta < 0 or self.max_skips < 0:
            raise ValueError("aquila needs tol > 0, beta >= 0, max_skips >= 0")

    def forward(
        self, tensors: AdapterState, state: Any, rng: torch.Generator
    ) -> tuple[AdapterState, dict[str, Any], Any]:
        st = dict(state or {"q": {}, "skips": 0})
        q: AdapterState = dict(st["q"])
        keys = sorted(k for k, v in tensors.items() if is_float(v) and v.numel() > 0)
        passthrough = {k: v for k, v in tensors.items() if k not in keys}
        vs = {k: tensors[k].float().reshape(-1) - q.get(k, torch.zeros(tensors[k].numel())) for k in keys}
        bits = choose_bits(list(vs.values()), self.tol)
        sent, codes_out = {}, {}
        for k in keys:
            codes, r, step = grid(vs[k], bits)
            sent[k] = codes * step - r
            codes_out[k] = (codes, r)
        err = sum(float((vs[k] - sent[k]).pow(2).sum()) for k in keys)
        size = sum(float(sent[k].pow(2).sum()) for k in keys)
        last = sum(float(x.pow(2).sum()) for x in q.values())
        skip = bool(q) and st["skips"] < self.max_skips and size + err <= self.beta * last
        if skip:
            st = {"q": q, "skips": st["skips"] + 1, "report": {"codec_bits": 0.0, "codec_skipped": 1.0}}
            return passthrough, {"skip": True}, st
        out = dict(passthrough)
        meta: dict[str, Any] = {"skip": False, "bits": bits, "shapes": {}}
        for k in keys:
            codes, r = codes_out[k]
            out[k + "|c"] = pack_bits(codes, bits)
            out[k + "|r"] = r.reshape(1).float()
            meta["shapes"][k] = list(tensors[k].shape)
            q[k] = q.get(k, torch.zeros(vs[k].numel())) + sent[k]
        report = {"codec_bits": float(bits), "codec_skipped": 0.0}
        return out, meta, {"q": q, "skips": 0, "report": report}

    def backward(self, tensors: AdapterState, meta: dict[str, Any], state: Any) -> tuple[AdapterState, Any]:
        q: AdapterState = dict((state or {}).get("q", {}))
        if meta.get("skip"):  # the server reuses the client's last update
            shapes = (state or {}).get("shapes", {})
            out = {k: v for k, v in tensors.items()}
            out.update({k: q[k].reshape(shapes[k]) for k in q})
            return out, state
        bits, shapes = meta["bits"], meta["shapes"]
        out = {k: v for k, v in tensors.items() if k.rsplit("|", 1)[0] not in shapes}
        for k, shape in shapes.items():
            n = math.prod(shape)
            r = tensors[k + "|r"].float()[0]
            step = 2 * r / ((1 << bits) - 1) if float(r) > 0 else torch.tensor(1.0)
            v = unpack_bits(tensors[k + "|c"], bits, n).float() * step - r
            q[k] = q.get(k, torch.zeros(n)) + v
            out[k] = q[k].reshape(shape)
        return out, {"q": q, "shapes": shapes}

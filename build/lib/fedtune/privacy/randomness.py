"""Where DP noise and secure-aggregation secrets come from.

- 'secure': the operating system's CSPRNG (`os.urandom`): nothing in a config, checkpoint or log
  can regenerate it. Gaussians by Box-Muller from 53-bit uniforms (not hardened against
  floating-point side channels, Mironov 2012). The only mode on a Flower deployment.
- 'seeded': a torch generator derived from the run seed: reproducible simulation noise, for
  research only (anyone with the config can subtract it), named so in every record.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import torch

from fedtune.seeding import torch_generator

SEEDED_NOTE = "seeded: reproducible simulation noise (anyone with the config can regenerate it)"
SECURE_NOTE = "secure: operating-system CSPRNG (never stored)"


class Noise(Protocol):
    def normal(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def uniform(self, n: int) -> torch.Tensor: ...


class SeededNoise:
    """Reproducible noise from a torch generator (simulation only)."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def normal(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=dtype)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.gen)


def _urandom_uniform(n: int) -> torch.Tensor:
    """n uniforms in (0, 1) from the OS CSPRNG (53 random bits each), float64."""
    raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
    bits = (raw >> 11) & ((1 << 53) - 1)  # 53 bits, non-negative
    return (bits.double() + 0.5) / float(1 << 53)


class SecureNoise:
    """Noise from the operating system's CSPRNG."""

    def normal(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        m = (n + 1) // 2
        u1, u2 = _urandom_uniform(m), _urandom_uniform(m)
        r = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.cat([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)])[:n]
        return z.reshape(tuple(shape)).to(dtype)

    def uniform(self, n: int) -> torch.Tensor:
        return _urandom_uniform(n).float()


def noise_source(mode: str, seed: int, *labels: object) -> Noise:
    """The noise of one mechanism: OS entropy ('secure') or the run seed + labels ('seeded')."""
    if mode == "secure":
        return SecureNoise()
    return SeededNoise(torch_generator(seed, *labels))


def describe(mode: str) -> str:
    return SECURE_NOTE if mode == "secure" else SEEDED_NOTE

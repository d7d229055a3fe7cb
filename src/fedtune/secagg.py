"""Secure aggregation in-process: pairwise additive masks (Bonawitz et al., CCS 2017, without the
dropout recovery), so the server only ever learns the sum of the clients' updates.

Each client k turns its update into fixed point, x_k = round(n_k * delta_k * 2^FRAC) (int64; the
example count n_k is the FedAvg weight, so the sum is the weighted sum), and adds a mask
    x_k + sum_{j > k} m_kj - sum_{j < k} m_jk   (mod 2^64)
where m_kj is a pseudo-random int64 tensor both k and j derive from a seed they share (here:
derived from the run seed and the pair; in a deployment, from a Diffie-Hellman key agreement).
In the sum over the round's participants every mask appears once with + and once with -, so
the masks cancel exactly in int64 arithmetic and the server recovers sum_k n_k delta_k / 2^FRAC
(fixed-point error <= n / 2^(FRAC+1) per coordinate) without seeing any single update.

The participants are the clients that reply this round (the in-process engine knows its
dropouts in advance); a client lost after masking would leave its masks in the sum, which is
what SecAgg+'s secret sharing repairs on Flower and which is not simulated here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.seeding import derive_seed
from fedtune.types import AdapterState

SECURE_SUM = "secure-sum"  # the id of the one update a strategy sees under secure aggregation
FRAC = 24  # fractional bits of the fixed-point encoding
MASK_RANGE = 2**62


def to_fixed(delta: AdapterState, weight: float) -> AdapterState:
    return {k: torch.round(v.double() * weight * 2.0**FRAC).to(torch.int64) for k, v in delta.items()}


def pair_mask(seed: int, rnd: int, a: str, b: str, shapes: Mapping[str, torch.Size]) -> AdapterState:
    lo, hi = sorted((a, b))
    gen = torch.Generator().manual_seed(derive_seed(seed, "secagg", rnd, lo, hi))
    return {
        k: torch.randint(-MASK_RANGE, MASK_RANGE, shapes[k], generator=gen, dtype=torch.int64) for k in sorted(shapes)
    }


def mask(fixed: AdapterState, me: str, participants: Sequence[str], seed: int, rnd: int) -> AdapterState:
    """x_me + sum_{j > me} m_{me,j} - sum_{j < me} m_{j,me} (int64, wrapping)."""
    out = {k: v.clone() for k, v in fixed.items()}
    shapes = {k: v.shape for k, v in fixed.items()}
    for other in participants:
        if other == me:
            continue
        m = pair_mask(seed, rnd, me, other, shapes)
        sign = 1 if me < other else -1
        for k in out:
            out[k] += sign * m[k]
    return out


def unmask_sum(masked: Sequence[AdapterState]) -> AdapterState:
    """The float sum of the clients' weighted updates, from their masked fixed-point uploads."""
    total = {k: torch.zeros_like(v) for k, v in masked[0].items()}
    for m in masked:
        for k in total:
            total[k] += m[k]
    return {k: (v.double() / 2.0**FRAC).float() for k, v in total.items()}


@dataclass(frozen=True)
class MaskTransform:
    """The last client-side step under secure aggregation: fixed point, weighted by the
    strategy's sum weight ('examples' = n_k, 'uniform' = 1), then masked with the round's
    participants."""

    seed: int
    weighting: str = "examples"

    def __call__(self, delta: AdapterState, job: Any, shard: Any) -> AdapterState:
        weight = 1.0 if self.weighting == "uniform" else float(shard.num_examples)
        return mask(to_fixed(delta, weight), job.client_id, job.participants, self.seed, job.round)


def secure_sum(updates: Sequence[Any], weighting: str = "examples") -> Any:
    """The one update a strategy sees under secure aggregation: sum_k w_k delta_k / sum_k w_k
    (w_k = n_k, the FedAvg weight, or 1), recovered from the masked fixed-point uploads (the masks
    cancel in the sum)."""
    from fedtune.types import ClientUpdate

    n = sum(1.0 if weighting == "uniform" else float(u.num_examples) for u in updates)
    total = unmask_sum([u.delta for u in updates])
    return ClientUpdate(SECURE_SUM, {k: v / n for k, v in total.items()}, n, {"train_loss": 0.0}, 0, 0)  # type: ignore[arg-type]

"""Linear algebra of LoRA factors across clients (pure functions).

Notation (arXiv:2106.09685): dW = s * B @ A with A: [r, k] (`lora_A.weight`), B: [d, r]
(`lora_B.weight`). Averaging the factors separately gives B_bar @ A_bar, not sum_k p_k B_k @ A_k;
the difference is exactly sum_k p_k (B_k - B_bar)(A_k - A_bar) (algorithms.md section 3.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.types import AdapterState

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def lora_modules(state: AdapterState) -> list[str]:
    """Module prefixes that carry a LoRA pair in `state`."""
    return sorted(
        k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in state
    )


def products(state: AdapterState) -> dict[str, torch.Tensor]:
    """B @ A per module (fp64), without the scale s."""
    return {m: state[m + B_SUFFIX].double() @ state[m + A_SUFFIX].double() for m in lora_modules(state)}


def mean_of_products(states: Sequence[AdapterState], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k p_k B_k @ A_k per module: the exact aggregate every exact method targets."""
    per = [products(s) for s in states]
    return {m: sum(w * p[m] for w, p in zip(weights, per)) for m in per[0]}  # type: ignore[misc]


def covariance_error(states: Sequence[AdapterState], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k p_k (B_k - B_bar)(A_k - A_bar): what FedIT's factor average misses, per module."""
    out = {}
    for m in lora_modules(states[0]):
        a_bar = sum(w * s[m + A_SUFFIX].double() for w, s in zip(weights, states))
        b_bar = sum(w * s[m + B_SUFFIX].double() for w, s in zip(weights, states))
        out[m] = sum(
            w * (s[m + B_SUFFIX].double() - b_bar) @ (s[m + A_SUFFIX].double() - a_bar) for w, s in zip(weights, states)
        )
    return out  # type: ignore[return-value]


def relative_error(exact: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """||exact - got||_F / ||exact||_F over all modules."""
    num = sum(float((exact[m] - got[m]).pow(2).sum()) for m in exact)
    den = sum(float(exact[m].pow(2).sum()) for m in exact)
    return (num / den) ** 0.5 if den > 0 else 0.0

"""Checks on every client update before it reaches a strategy: a bad update becomes a recorded
ClientFailure (the round continues with the others), never an exception or a poisoned model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.types import AdapterState, ClientFailure, ClientUpdate


def update_problem(
    update: ClientUpdate, expected: Mapping[str, torch.Size] | None, max_bytes: int | None, masked: bool = False
) -> str | None:
    """Why `update` must be rejected, or None. `expected`: the keys and shapes an adapter delta
    must have (None when the strategy defines its own payload, e.g. FedKSeed's scalars)."""
    if max_bytes is not None and update.bytes_up > max_bytes:
        return f"payload of {update.bytes_up} bytes exceeds sampling.max_update_mb ({max_bytes} bytes)"
    if update.num_examples < 0:
        return f"negative example count {update.num_examples}"
    delta = update.delta
    if expected is not None:
        unknown = sorted(set(delta) - set(expected))
        missing = sorted(set(expected) - set(delta))
        if unknown:
            return f"unknown keys {unknown[:3]}"
        if missing:
            return f"missing keys {missing[:3]}"
        for k, shape in expected.items():
            if tuple(delta[k].shape) != tuple(shape):
                return f"{k} has shape {tuple(delta[k].shape)}, expected {tuple(shape)}"
    for k, v in delta.items():
        if masked and v.dtype != torch.int64:
            return f"{k} has dtype {v.dtype}, expected int64 (a masked secure-aggregation upload)"
        if not masked and expected is not None and not v.is_floating_point():
            return f"{k} has dtype {v.dtype}, expected a floating-point tensor"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"{k} contains NaN or Inf"
    return None


def screen(
    updates: list[ClientUpdate],
    sent: Mapping[str, AdapterState],
    expected_of: object,
    max_bytes: int | None,
    masked: bool = False,
) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """(accepted updates, rejections) for one round; `expected_of(sent_state)` gives the
    expected keys and shapes (or None)."""
    ok, bad = [], []
    for u in updates:
        expected = expected_of(sent[u.client_id]) if callable(expected_of) else None
        reason = update_problem(u, expected, max_bytes, masked)
        if reason is None:
            ok.append(u)
        else:
            bad.append(ClientFailure(u.client_id, f"rejected: {reason}", u.bytes_down, u.bytes_up))
    return ok, bad

"""Which loop runs a strategy that has no place in the federated one (declared capabilities)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.recipes.federated import RunResult


def own_loop(caps: Any) -> Callable[..., RunResult] | None:
    """The serverless peers' loop (`peer_to_peer`), the own-models distillation loop
    (`own_models`), or None: the federated loop."""
    if caps.peer_to_peer:
        from fedtune.recipes.decentralized import run_peers

        return run_peers
    if caps.own_models:
        from fedtune.recipes.distill import run_distill

        return run_distill
    return None

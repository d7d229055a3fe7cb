"""Which loop runs a strategy that has no place in the federated one (declared capabilities), or
a task that has its own (`task: embedding`)."""

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


def task_loop(cfg: Any) -> Callable[..., RunResult] | None:
    """The GEM embedding loop for `task: embedding` (it builds its own parties and model), or None."""
    if cfg.task == "embedding":
        from fedtune.recipes.embedding import run_embedding

        return run_embedding
    return None

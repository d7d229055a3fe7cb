"""The running totals of a run's loop (bytes, DP-SGD steps and epsilon, stop reason, seconds):
checkpointed with every round, so a resumed run reports what an uninterrupted one would. Used by
the federated, decentralized and distillation loops."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedtune.client.run import ClientReply
from fedtune.secagg import SECURE_SUM
from fedtune.types import ClientFailure


@dataclass
class Ledger:
    """Running totals a resumed run needs (checkpointed with the round)."""

    cum_bytes: int = 0
    dp_steps: dict[str, int] = field(default_factory=dict)  # DP-SGD local steps per client so far
    sample_epsilon: float = 0.0
    stopped: str | None = None
    io_seconds: float = 0.0  # appending records + writing checkpoints (of the rounds checkpointed)
    wall_before: float = 0.0  # wall seconds of the run's earlier processes, up to their last checkpoint
    resume_setup: float = 0.0  # set-up seconds of the processes that resumed the run

    def saved(self, t_start: float) -> dict[str, Any]:
        """The checkpoint's part: the totals, with this process's seconds so far in `wall_before`."""
        return {**self.__dict__, "wall_before": self.wall(t_start)}

    def wall(self, t_start: float) -> float:
        """The run's wall seconds so far, over every process (a resumed run's summary splits them)."""
        return self.wall_before + time.perf_counter() - t_start


def trained_replies(replies: Sequence[ClientReply | ClientFailure]) -> list[ClientReply]:
    """The clients whose training DP-SGD's accountant counts: every one that replied, a rejected
    upload too (the server decoded it, and the client's state carries those steps into its later
    uploads); failures never trained (injected faults stop a client before it runs)."""
    return [r for r in replies if isinstance(r, ClientReply) and r.client_id != SECURE_SUM]


def update_ledger(
    ledger: Ledger,
    summary: dict[str, Any],
    trained: Sequence[ClientReply],
    eps: dict[str, tuple[float, float]],
    stop: str | None,
) -> Ledger:
    steps = dict(ledger.dp_steps)
    for u in trained:
        if "dp_steps" in u.metrics:
            steps[u.client_id] = steps.get(u.client_id, 0) + int(u.metrics["dp_steps"])
    worst = max([ledger.sample_epsilon, *(e for e, _ in eps.values())])
    return replace(ledger, cum_bytes=summary["cum_bytes"], dp_steps=steps, sample_epsilon=worst, stopped=stop)

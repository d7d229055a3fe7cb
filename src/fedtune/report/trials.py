"""The trials of a `fedtune tune` study: a console table, trials.csv / trials.md, and a plot of the
objective by trial (plain rows: this module does not import optuna)."""

from __future__ import annotations

import csv
import io as _io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.files import write_atomic


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None  # the objective; for a pruned trial, its last reported round
    seconds: float | None
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # pruned after round r; the error of a failed trial; re-run as trial k


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def _cells(row: TrialRow, keys: Sequence[str]) -> list[str]:
    params = [_fmt(row.params.get(k)) for k in keys]
    secs = "" if row.seconds is None else f"{row.seconds:.1f}"
    return [str(row.number), *params, _fmt(row.value), row.state, secs, row.note]


def _keys(rows: Sequence[TrialRow]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.params))


def trials_table(rows: Sequence[TrialRow], metric: str, best: int | None) -> Table:
    """The trials as a rich table; the best trial in bold."""
    keys = _keys(rows)
    t = Table(title=f"trials ({metric})", title_justify="left")
    for name in ["trial", *keys, metric, "state", "seconds", "note"]:
        t.add_column(name, overflow="fold")
    for r in rows:
        t.add_row(*_cells(r, keys), style="bold" if r.number == best else None)
    return t


def write_trials(rows: Sequence[TrialRow], out_dir: Path, metric: str) -> list[Path]:
    """trials.csv (full-precision values) and trials.md (the console table as markdown)."""
    keys = _keys(rows)
    header = ["trial", *keys, metric, "state", "seconds", "note"]
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r.number, *(r.params.get(k, "") for k in keys), r.value, r.state, r.seconds, r.note])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r, keys)) + " |" for r in rows]
    paths = [out_dir / "trials.csv", out_dir / "trials.md"]
    write_atomic(paths[0], buf.getvalue())
    write_atomic(paths[1], "\n".join(md) + "\n")
    return paths


def plot_trials(rows: Sequence[TrialRow], path: Path, metric: str, minimize: bool) -> Path:
    """The objective by trial: finished trials as dots, pruned ones as crosses at their last
    reported round, and the best value so far as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [(r.number, r.value) for r in rows if r.state == "COMPLETE" and r.value is not None]
    pruned = [(r.number, r.value) for r in rows if r.state == "PRUNED" and r.value is not None]
    ax.plot([n for n, _ in done], [v for _, v in done], "o", color="C0", label="finished")
    if pruned:
        ax.plot([n for n, _ in pruned], [v for _, v in pruned], "x", color="C3", label="pruned (its last round)")
    best: list[float] = []
    for _, v in done:
        best.append(v if not best else (min if minimize else max)(best[-1], v))
    if done:  # drawn to the last trial, whatever its state
        last = max(r.number for r in rows)
        ax.step([n for n, _ in done] + [last], [*best, best[-1]], where="post", color="C2", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} ({'lower' if minimize else 'higher'} is better)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

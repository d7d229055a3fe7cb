"""PNG plots: per-client test loss by round, and cumulative bytes moved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _series(records: Sequence[dict[str, Any]], client: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in records if r.get("client") == client and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


MAX_LINES = 10  # past this many clients the loss plot shows mean, worst and a percentile band


def _band(ax: Any, recs: Sequence[dict[str, Any]], name: str, color: str, style: str) -> None:
    """Mean and worst test loss per round over the clients evaluated, and the 10-90 % band."""
    import numpy as np

    by_round: dict[int, list[float]] = {}
    for r in recs:
        if r.get("client") and "test_loss" in r:
            by_round.setdefault(int(r["round"]), []).append(float(r["test_loss"]))
    xs = sorted(by_round)
    vals = [np.asarray(by_round[x]) for x in xs]
    ax.fill_between(
        xs, [np.percentile(v, 10) for v in vals], [np.percentile(v, 90) for v in vals], color=color, alpha=0.2
    )
    ax.plot(xs, [v.mean() for v in vals], style, color=color, marker="o", ms=3, label=f"{name}: mean")
    ax.plot(xs, [v.max() for v in vals], style, color=color, alpha=0.6, label=f"{name}: worst client")


def plot_runs(runs: dict[str, Sequence[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Write loss.png (per-client test loss by round, one line style per run) and bytes.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    clients = sorted({r["client"] for recs in runs.values() for r in recs if r.get("client")})
    colors = {c: f"C{i % 10}" for i, c in enumerate(clients)}
    many = len(clients) > MAX_LINES  # one line per client is unreadable: mean, worst and a band
    for i, (name, recs) in enumerate(runs.items()):
        if many:
            _band(ax, recs, name, f"C{i % 10}", styles[i % len(styles)])
            continue
        for c in clients:
            x, y = _series(recs, c, "test_loss")
            if x:
                label = c if len(runs) == 1 else f"{name}: {c}"
                ax.plot(x, y, styles[i % len(styles)], color=colors[c], marker="o", ms=3, label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test loss (nats/token)")
    title = f"test loss over {len(clients)} clients: mean, worst, 10-90 % band" if many else "per-client test loss"
    ax.set_title(title + ("" if len(runs) == 1 else " (line style = run)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    loss_png = out_dir / "loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in runs.items():
        rr = [r for r in recs if r.get("client") is None]
        ax.plot([r["round"] for r in rr], [r.get("cum_bytes", 0) / 1e6 for r in rr], marker="o", label=name)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cumulative MB moved (up + down)")
    ax.set_title("communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    bytes_png = out_dir / "bytes.png"
    fig.savefig(bytes_png, dpi=110)
    plt.close(fig)
    return [loss_png, bytes_png]

"""trust.png: the trust each party receives from the others, by round (trust_distill, PCL-style
trust records: each client record's `trust_received`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_trust(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """One line per party: the mean of the other parties' trust in it, per round (None: no trust
    was recorded, e.g. every round was a warm-up)."""
    pts: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("client") is not None and "trust_received" in r:
            pts.setdefault(str(r["client"]), []).append((int(r["round"]), float(r["trust_received"])))
    if not pts:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in sorted(pts):
        ax.plot([p[0] for p in pts[c]], [p[1] for p in pts[c]], marker="o", ms=3, label=c)
    ax.set_xlabel("round")
    ax.set_ylabel("trust received (mean of the other parties' weights)")
    ax.set_title("trust by round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "trust.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

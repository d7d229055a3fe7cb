"""Parties without labels: FedMM vs FedAvg-GDA vs ignoring the unlabelled party (FedAvg over the
labelled ones), on the target party's accuracy.

    .venv/bin/python bench/fedmm.py                                      # configs/fedmm.yaml, SmolLM2
    .venv/bin/python bench/fedmm.py --config configs/fedmm_tiny.yaml --out bench/out/fedmm-smoke

Task: configs/fedmm.yaml: 20 Newsgroups instruction classification over four topics; parties
source-0 (graphics, hockey) and source-1 (medicine, guns) have labels; party `target` has posts of
all four topics with 15 % of letters replaced at random, and no labels (FedMM never lets them reach
a loss). Methods are `strategy.method` of the same strategy, so data, local steps, learning rate and
weights are the same: fedmm (the paper's primal-dual update), gda (local gradient descent-ascent,
averaged), source_only (the unlabelled party left out; no discriminator).
Reported after the last round: accuracy on the target party's test split (the number that
matters), mean accuracy on the labelled parties' own test splits, the discriminator's domain
accuracy during the last round's training, MB moved, seconds of the rounds.
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runs import run_rows

METHODS = {m: [f"strategy.method={m}"] for m in ("fedmm", "gda", "source_only")}


def last(records: list[dict[str, Any]], client: str | None, key: str) -> Any:
    """`key` of `client`'s record (None: the round summary) in the last round that has it."""
    vals = [r[key] for r in records if r["client"] == client and key in r]
    return vals[-1] if vals else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/fedmm.yaml")
    ap.add_argument("--out", default="bench/out/fedmm")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--report-only", action="store_true", help="run nothing; tabulate the finished methods")
    a = ap.parse_args()
    out = Path(a.out)
    rows = {m: METHODS[m] for m in a.methods.split(",") if m}
    res = run_rows(rows, a.config, [], out, only_finished=a.report_only)

    def pct(x: Any) -> str:
        return f"{100 * x:.1f} %" if isinstance(x, int | float) else "-"

    lines = [
        f"Config {a.config}; target = the unlabelled, character-noised party.",
        "",
        "| method | target acc (round 0 -> final) | labelled parties acc (mean) | domain acc | MB moved | rounds s |",
        "|---|---|---|---|---|---|",
    ]
    table: dict[str, dict[str, Any]] = {}
    for m, r in res.items():
        recs = r["records"]
        sources = sorted({x["client"] for x in recs if x["client"] not in (None, "target")})
        src = [last(recs, c, "global_acc") for c in sources]
        base = [x.get("global_acc") for x in recs if x["round"] == 0 and x["client"] == "target"]
        row = {
            "target_acc_base": base[0] if base else None,
            "target_acc": last(recs, "target", "global_acc"),
            "labelled_acc": sum(src) / len(src) if src and None not in src else None,
            "domain_acc": last(recs, None, "domain_acc"),
            "mb": (last(recs, None, "cum_bytes") or 0) / 1e6,
            "rounds_s": r["summary"].get("round_seconds"),
        }
        table[m] = row
        lines.append(
            f"| {m} | {pct(row['target_acc_base'])} -> {pct(row['target_acc'])} | {pct(row['labelled_acc'])} "
            f"| {pct(row['domain_acc'])} | {row['mb']:.2f} | {row['rounds_s'] or 0:.0f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Ghost Noise Injection (arXiv:2305.17205) as a regulariser of the local step on the instruction
task: does it help each party's model generalise to the other parties' data?

    .venv/bin/python bench/ghost_noise.py                       # configs/demo.yaml, SmolLM2
    .venv/bin/python bench/ghost_noise.py --rows local "local + GNI 8"     # two of the rows
    .venv/bin/python bench/ghost_noise.py --config configs/tiny.yaml --out bench/out/ghost-smoke   # the script

Task: configs/demo.yaml (four label-skewed parties, 3 rounds of FedAvg) with `evaluation.ood: true`:
every party's model is also scored on the class-balanced mixture of all parties' test data, the
"other parties" the question asks about. Rows: FedAvg without noise, and with ghost batches of 32
and 8 tokens (less and more noise), and local-only with and without (where a regulariser should
matter most: no averaging smooths a party's own fit). Reported: mean / worst accuracy on the own
test split, mean accuracy on the mixture (ood), and the same for perplexity where there is no
accuracy (raw-text configs). Writes OUT.md. Not run here: the demo takes about 10 minutes per row
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import final, run_rows

ROWS = {
    "fedavg": ["strategy.name=fedavg"],
    "fedavg + GNI 32": ["strategy.name=fedavg", "train.ghost_noise.batch_size=32"],
    "fedavg + GNI 8": ["strategy.name=fedavg", "train.ghost_noise.batch_size=8"],
    "fedavg + GNI 8, final norm": [
        "strategy.name=fedavg",
        "train.ghost_noise.batch_size=8",
        "train.ghost_noise.last=1",
    ],
    "local": ["strategy.name=local"],
    "local + GNI 8": ["strategy.name=local", "train.ghost_noise.batch_size=8"],
}
KEYS = ("mean_acc", "worst_acc", "ood_mean_acc", "mean_ppl", "worst_ppl", "ood_mean_ppl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="bench/out/ghost_noise")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="a subset of the rows")
    a = ap.parse_args()
    out = Path(a.out)
    results = run_rows({r: ROWS[r] for r in a.rows}, a.config, ["evaluation.ood=true"], out)
    lines = ["| row | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for row, res in results.items():
        cells = [f"{v:.4g}" if isinstance(v := final(res, k), float) else "-" for k in KEYS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    md = f"# Ghost Noise Injection ({a.config})\n\n" + "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Aggregation strategies on the default real task: quality vs bytes vs time.

    .venv/bin/python bench/aggregation.py                    # all rows below, about 45 min on 2 cores
    .venv/bin/python bench/aggregation.py --rows fedavg,fedsb --rounds 2

Each row is one `fedtune run` of configs/lm.yaml (SmolLM2-135M-Instruct, LoRA r=8 on q,v,
four 20-Newsgroups topics as clients, bf16) with the row's overrides. Writes
bench/out/aggregation/<row>/ run dirs, bench/out/aggregation.md (table) and
bench/out/aggregation.png (mean test ppl vs total MB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "fedavg": ["strategy.name=fedavg"],
    "fedit": ["strategy.name=fedit"],
    "ffa_lora": ["strategy.name=ffa_lora"],
    "ffa_lora lr 5e-3": ["strategy.name=ffa_lora", "train.lr=0.005"],
    "fedex_lora": ["strategy.name=fedex_lora"],
    "flora": ["strategy.name=flora"],
    "flora ranks 4,8,8,16": ["strategy.name=flora", "adapter.ranks=[4, 8, 8, 16]"],
    "flexlora": ["strategy.name=flexlora"],
    "hetlora ranks 4,8,8,16": ["strategy.name=hetlora", "adapter.ranks=[4, 8, 8, 16]"],
    "lora_fair": ["strategy.name=lora_fair"],
    "fedsb": ["strategy.name=fedsb", "adapter.kind=lora_sb"],
    "fedsb lr 1e-2": ["strategy.name=fedsb", "adapter.kind=lora_sb", "train.lr=0.01"],
    "fedadam(ffa)": ["strategy.name=fedadam", "strategy.inner=ffa_lora", "strategy.server_lr=0.003"],
    "local": ["strategy.name=local"],
    "centralized": ["strategy.name=centralized"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/out/aggregation")
    args = ap.parse_args()

    import datasets
    from transformers.utils import logging as hf_logging

    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    results = {}
    for row in args.rows.split(","):
        d = out / row.replace(" ", "_").replace(",", "-")
        if not (d / "summary.json").exists():
            cfg = load_config(
                "configs/lm.yaml", [*ROWS[row], f"rounds={args.rounds}", f"output_dir={d}", f"name={row}"]
            )
            run_federated(cfg, overwrite=True, progress=False)
        results[row] = json.loads((d / "summary.json").read_text())
        print(row, results[row]["final"].get("mean_ppl"), flush=True)
    write_table(results, out.with_suffix(".md"))
    plot(results, out.with_suffix(".png"))


def write_table(results: dict, path: Path) -> None:
    clients = sorted(next(iter(results.values()))["clients"])
    head = "| strategy | " + " | ".join(clients) + " | mean ppl | worst | MB moved | wall s |"
    lines = [head, "|" + "---|" * (len(clients) + 5)]
    base = next(iter(results.values()))["clients"]
    lines.append(
        "| base model | " + " | ".join(f"{base[c]['base_ppl']:.2f}" for c in clients) + " | "
        f"{sum(base[c]['base_ppl'] for c in clients) / len(clients):.2f} | "
        f"{max(base[c]['base_ppl'] for c in clients):.2f} | 0 | - |"
    )
    for row, s in results.items():
        f = s["final"]
        lines.append(
            f"| {row} | "
            + " | ".join(f"{s['clients'][c]['final_ppl']:.2f}" for c in clients)
            + f" | {f['mean_ppl']:.2f} | {f['worst_ppl']:.2f} | {f['cum_bytes'] / 1e6:.2f} | {s['wall_seconds']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for row, s in results.items():
        x, y = max(s["final"]["cum_bytes"] / 1e6, 1e-3), s["final"]["mean_ppl"]
        ax.scatter(x, y)
        ax.annotate(row, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("total MB moved (up + down, all clients, all rounds; log)")
    ax.set_ylabel("mean test perplexity after the last round")
    ax.set_title("aggregation strategies: quality vs communication")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

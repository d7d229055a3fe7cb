"""Communication: quality vs bytes for codecs, lazy uploads and seed-based zeroth-order training.

    .venv/bin/python bench/communication.py                 # all rows, about 40 min on 2 cores
    .venv/bin/python bench/communication.py --rows "fedit fp32;fedsb q4"

Each row is one run of configs/lm.yaml (SmolLM2-135M-Instruct, LoRA r=8 on q,v, four
20-Newsgroups topics, 3 rounds x 6 steps, bf16) with the row's overrides; the codec applies to the
uplink and the downlink unless the row sets downlink_codec. Writes bench/out/communication/<row>/,
bench/out/communication.md (table; ratio and change are against fp32 FedIT, the FlowerTune
baseline) and bench/out/communication.png (mean test ppl vs total MB, Pareto front marked).
"""

from __future__ import annotations

import argparse
from pathlib import Path

TOPK_EF = "codec.stages=[{name: topk, fraction: 0.05}, {name: quantize, bits: 8}]"
ROWS: dict[str, list[str]] = {
    "fedit fp32": ["strategy.name=fedit"],
    "fedit q8": ["strategy.name=fedit", "codec.name=quantize", "codec.bits=8"],
    "fedit q4": ["strategy.name=fedit", "codec.name=quantize", "codec.bits=4"],
    "fedit q2": ["strategy.name=fedit", "codec.name=quantize", "codec.bits=2"],
    "fedit top5%+EF+q8 up, q8 down": [
        "strategy.name=fedit",
        "codec.name=chain",
        TOPK_EF,
        "downlink_codec.name=quantize",
        "downlink_codec.bits=8",
    ],
    "fedit aquila up, q8 down": [
        "strategy.name=fedit",
        "codec.name=aquila",
        "downlink_codec.name=quantize",
        "downlink_codec.bits=8",
    ],
    "ffa_lora fp32": ["strategy.name=ffa_lora", "train.lr=0.005"],
    "ffa_lora q8": ["strategy.name=ffa_lora", "train.lr=0.005", "codec.name=quantize", "codec.bits=8"],
    "ffa_lora q4": ["strategy.name=ffa_lora", "train.lr=0.005", "codec.name=quantize", "codec.bits=4"],
    "fedsb fp32": ["strategy.name=fedsb", "adapter.kind=lora_sb", "train.lr=0.01"],
    "fedsb q8": ["strategy.name=fedsb", "adapter.kind=lora_sb", "train.lr=0.01", "codec.name=quantize", "codec.bits=8"],
    "fedsb q4": ["strategy.name=fedsb", "adapter.kind=lora_sb", "train.lr=0.01", "codec.name=quantize", "codec.bits=4"],
    "fedsb q2": ["strategy.name=fedsb", "adapter.kind=lora_sb", "train.lr=0.01", "codec.name=quantize", "codec.bits=2"],
    "fedkseed one-byte": [
        "strategy.name=fedkseed",
        "strategy.lr=0.001",
        "strategy.one_byte=true",
        "train.steps=30",
    ],
}
BASELINE = "fedit fp32"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=";".join(ROWS), help="row names separated by ';'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/out/communication")
    args = ap.parse_args()

    from runs import run_rows

    out = Path(args.out)
    chosen = {row: [*ROWS[row], f"rounds={args.rounds}"] for row in args.rows.split(";")}
    results = run_rows(chosen, "configs/lm.yaml", [], out)
    text = table(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    plot(results, out.with_suffix(".png"))


def per_client_round(recs: list[dict]) -> tuple[float, float]:
    """(mean bytes up, mean bytes down) per participating client per round."""
    rows = [r for r in recs if r["client"] and r["round"] > 0 and "bytes_up" in r]
    return sum(r["bytes_up"] for r in rows) / len(rows), sum(r["bytes_down"] for r in rows) / len(rows)


def table(results: dict) -> str:
    base = results.get(BASELINE)
    lines = [
        "| method | mean test ppl | change vs fp32 FedIT | total MB | fewer bytes than fp32 FedIT "
        "| KB up / client / round | KB down / client / round | uploads skipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results.items():
        f = r["summary"]["final"]
        up, down = per_client_round(r["records"])
        skipped = sum(x.get("codec_skipped", 0) for x in r["records"] if x["client"])
        if base:
            b = base["summary"]["final"]
            change = f"{100 * (f['mean_ppl'] / b['mean_ppl'] - 1):+.2f} %"
            ratio = f"{b['cum_bytes'] / f['cum_bytes']:.1f}x"
        else:
            change = ratio = "-"
        lines.append(
            f"| {row} | {f['mean_ppl']:.2f} | {change} | {f['cum_bytes'] / 1e6:.3f} | {ratio} "
            f"| {up / 1e3:.1f} | {down / 1e3:.1f} | {int(skipped)} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {
        row: (r["summary"]["final"]["cum_bytes"] / 1e6, r["summary"]["final"]["mean_ppl"]) for row, r in results.items()
    }
    front = [
        row
        for row, (x, y) in pts.items()
        if not any(x2 <= x and y2 < y or x2 < x and y2 <= y for x2, y2 in pts.values())
    ]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for row, (x, y) in pts.items():
        ax.scatter(x, y, marker="*" if row in front else "o", s=90 if row in front else 30)
        ax.annotate(row, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fx = sorted(front, key=lambda r: pts[r][0])
    ax.plot([pts[r][0] for r in fx], [pts[r][1] for r in fx], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("total MB moved (up + down, all clients, 3 rounds; log)")
    ax.set_ylabel("mean test perplexity after the last round")
    ax.set_title("communication: quality vs bytes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

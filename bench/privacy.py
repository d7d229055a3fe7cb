"""Privacy: mean test perplexity vs epsilon for user-level DP-FedAvg around FedIT (noise on A and B),
FFA-LoRA (B only) and Fed-SB (R only).

    .venv/bin/python bench/privacy.py                                # real task (configs/demo.yaml)
    .venv/bin/python bench/privacy.py --config configs/tiny.yaml     # a smoke run in a minute

Every row: adaptive clipping (median quantile), `sampling.fraction` 1, delta 1e-5; sigma in
{0.3, 0.6, 1.2} plus the non-private run of the same inner strategy, and sample-level DP-SGD
(`train.dp_sgd`) with each inner strategy. Writes bench/out/privacy.md
and bench/out/privacy.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import final, run_rows

INNER = {
    "fedit": ["strategy.inner=fedit"],
    "ffa_lora": ["strategy.inner=ffa_lora", "train.lr=0.005"],
    "fedsb": ["strategy.inner=fedsb", "adapter.kind=lora_sb", "train.lr=0.01"],
}
SIGMAS = [0.3, 0.6, 1.2]
# sample-level DP-SGD on each client (per-example clipping), the same inner strategies
SAMPLE_SIGMA, SAMPLE_CLIP = 1.0, 1.0


def rows() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for inner, over in INNER.items():
        plain = [o.replace("strategy.inner=", "strategy.name=") for o in over]
        out[f"{inner} non-private"] = plain
        for s in SIGMAS:
            out[f"{inner} sigma {s}"] = [
                "strategy.name=dp_fedavg",
                *over,
                f"strategy.noise_multiplier={s}",
                "strategy.adaptive=true",
                "strategy.clip=0.05",
            ]
        out[f"{inner} dp-sgd {SAMPLE_SIGMA}"] = [
            *plain,
            f"train.dp_sgd.noise_multiplier={SAMPLE_SIGMA}",
            f"train.dp_sgd.clip={SAMPLE_CLIP}",
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="bench/out/privacy")
    a = ap.parse_args()
    out = Path(a.out)
    res = run_rows(rows(), a.config, [], out)
    lines = [
        "| method | noise multiplier | epsilon (delta 1e-5) | mean test ppl | final clip S |",
        "|---|---|---|---|---|",
    ]
    for row, r in res.items():
        if "dp-sgd" in row:
            continue
        eps, clip = final(r, "epsilon"), final(r, "dp_clip")
        sigma = row.rsplit(" ", 1)[-1] if "sigma" in row else "-"
        e = f"{eps:.2f}" if eps is not None else "inf (no DP)"
        c = f"{clip:.3g}" if clip is not None else "-"
        lines.append(f"| {row.split(' ')[0]} | {sigma} | {e} | {final(r):.2f} | {c} |")
    lines += [
        "",
        f"Sample-level DP-SGD on every client (noise multiplier {SAMPLE_SIGMA}, per-example clip {SAMPLE_CLIP}, "
        "Poisson batches of expected size train.batch_size):",
        "",
        "| method | worst client's sample-level epsilon (delta 1e-5) | mean test ppl | no-DP ppl |",
        "|---|---|---|---|",
    ]
    for inner in INNER:
        r = res[f"{inner} dp-sgd {SAMPLE_SIGMA}"]
        lines.append(
            f"| {inner} + DP-SGD | {final(r, 'sample_epsilon'):.2f} | {final(r):.2f} "
            f"| {final(res[f'{inner} non-private']):.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for inner in INNER:
        pts = sorted((final(res[f"{inner} sigma {s}"], "epsilon"), final(res[f"{inner} sigma {s}"])) for s in SIGMAS)
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"DP-FedAvg({inner})")
        ax.axhline(final(res[f"{inner} non-private"]), ls=":", color=line[0].get_color())
        sgd = res[f"{inner} dp-sgd {SAMPLE_SIGMA}"]
        ax.plot(
            [final(sgd, "sample_epsilon")],
            [final(sgd)],
            "s",
            color=line[0].get_color(),
            label=f"{inner} + DP-SGD (sample-level)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("epsilon at delta = 1e-5 (log; circles user-level, squares sample-level)")
    ax.set_ylabel("mean test perplexity (dotted: no DP)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()

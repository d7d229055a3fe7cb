"""Privacy: mean test perplexity vs epsilon for user-level DP-FedAvg around FedIT (noise on A and B),
FFA-LoRA (B only) and Fed-SB (R only), and sample-level DP-SGD.

    .venv/bin/python bench/privacy.py                                # real task (configs/lm.yaml)
    .venv/bin/python bench/privacy.py --config configs/tiny.yaml     # a smoke run in a minute

Protocol (the same tuning budget for every method): for each inner method, four learning rates
(a factor 2 apart, from half its usual one up to four times it) are run without DP with `evaluation.val: true`; the one
with the lowest final mean *validation* perplexity is kept (the test split is never used to
choose). Then, at that learning rate: DP-FedAvg with adaptive clipping (median quantile, from
S = 0.05) at sigma in {0.3, 0.6, 1.2}, and sample-level DP-SGD. `sampling.fraction` 1, delta 1e-5,
Fed-SB's LoRA-SB initialised from a public corpus (`adapter.sb_init: source:stdlib`), DP-SGD's
unit a packed block, and seeded (reproducible simulation) noise, all recorded in every run.
Writes bench/out/privacy.md and bench/out/privacy.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import final, run_rows

INNER = {
    "fedit": ["strategy.inner=fedit"],
    "ffa_lora": ["strategy.inner=ffa_lora"],
    "fedsb": ["strategy.inner=fedsb", "adapter.kind=lora_sb", "adapter.sb_init=source:stdlib"],
}
LRS = {
    "fedit": [5e-4, 1e-3, 2e-3, 4e-3],
    "ffa_lora": [2.5e-3, 5e-3, 1e-2, 2e-2],
    "fedsb": [5e-3, 1e-2, 2e-2, 4e-2],
}
SIGMAS = [0.3, 0.6, 1.2]
# sample-level DP-SGD on each client (per-example clipping), the same inner strategies
SAMPLE_SIGMA, SAMPLE_CLIP = 1.0, 1.0


def plain(inner: str) -> list[str]:
    return [o.replace("strategy.inner=", "strategy.name=") for o in INNER[inner]]


def tuning_rows() -> dict[str, list[str]]:
    return {
        f"{inner} non-private lr {lr:g}": [*plain(inner), f"train.lr={lr}", "evaluation.val=true"]
        for inner in INNER
        for lr in LRS[inner]
    }


def private_rows(lr: dict[str, float]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for inner, over in INNER.items():
        for s in SIGMAS:
            out[f"{inner} sigma {s}"] = [
                "strategy.name=dp_fedavg",
                *over,
                f"train.lr={lr[inner]}",
                f"strategy.noise_multiplier={s}",
                "strategy.adaptive=true",
                "strategy.clip=0.05",
            ]
        out[f"{inner} dp-sgd {SAMPLE_SIGMA}"] = [
            *plain(inner),
            f"train.lr={lr[inner]}",
            f"train.dp_sgd.noise_multiplier={SAMPLE_SIGMA}",
            f"train.dp_sgd.clip={SAMPLE_CLIP}",
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/lm.yaml")
    ap.add_argument("--out", default="bench/out/privacy")
    a = ap.parse_args()
    out = Path(a.out)
    tuned = run_rows(tuning_rows(), a.config, [], out)
    lines = [f"Learning rate per method, chosen on the validation split ({len(LRS['fedit'])} runs each, no DP):", ""]
    lines += ["| method | lr | final mean val ppl | final mean test ppl |", "|---|---|---|---|"]
    best: dict[str, float] = {}
    for inner in INNER:
        cands = {lr: tuned[f"{inner} non-private lr {lr:g}"] for lr in LRS[inner]}
        best[inner] = min(cands, key=lambda lr: final(cands[lr], "mean_val_ppl"))
        for lr, r in cands.items():
            mark = " (chosen)" if lr == best[inner] else ""
            lines.append(f"| {inner} | {lr:g}{mark} | {final(r, 'mean_val_ppl'):.2f} | {final(r):.2f} |")
    res = {f"{i} non-private": tuned[f"{i} non-private lr {best[i]:g}"] for i in INNER}
    res.update(run_rows(private_rows(best), a.config, [], out))
    lines += [
        "",
        "| method | lr | noise multiplier | epsilon (delta 1e-5) | mean test ppl | final clip S | accounting |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, r in res.items():
        if "dp-sgd" in row:
            continue
        inner = row.split(" ")[0]
        eps, clip = final(r, "epsilon"), final(r, "dp_clip")
        sigma = row.rsplit(" ", 1)[-1] if "sigma" in row else "-"
        e = f"{eps:.2f}" if eps is not None else "inf (no DP)"
        c = f"{clip:.3g}" if clip is not None else "-"
        how = final(r, "dp_accounting") or "-"
        lines.append(f"| {inner} | {best[inner]:g} | {sigma} | {e} | {final(r):.2f} | {c} | {how} |")
    lines += [
        "",
        f"Sample-level DP-SGD on every client (noise multiplier {SAMPLE_SIGMA}, per-example clip {SAMPLE_CLIP}, "
        "Poisson batches of expected size train.batch_size):",
        "",
        "| method | worst client's sample-level epsilon (delta 1e-5) | mean test ppl | no-DP ppl | unit | noise |",
        "|---|---|---|---|---|---|",
    ]
    for inner in INNER:
        r = res[f"{inner} dp-sgd {SAMPLE_SIGMA}"]
        lines.append(
            f"| {inner} + DP-SGD | {final(r, 'sample_epsilon'):.2f} | {final(r):.2f} "
            f"| {final(res[f'{inner} non-private']):.2f} | {final(r, 'sample_dp_unit')} "
            f"| {final(r, 'sample_dp_randomness')} |"
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

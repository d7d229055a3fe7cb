"""Privacy audit: the empirical lower bound on epsilon (one-run auditing, Steinke, Nasr and
Jagielski 2023, arXiv:2305.08846; `fedtune audit`) beside the accountant's epsilon, on SmolLM2.

    .venv/bin/python bench/audit.py                                # SmolLM2 (configs/lm.yaml)
    .venv/bin/python bench/audit.py --config configs/tiny.yaml     # a smoke run in a minute

Rows (FedIT = FedAvg on LoRA A and B, at the privacy benchmark's chosen lr 4e-3): 64 canaries of
one block of random tokens in one client's training split (each included with probability 1/2,
audit seed 0), then `fedtune audit` on the final global model (95 % confidence, Bonferroni over
3 guess counts):
- non-private, the config as is (each canary is drawn about steps x batch / blocks times a round);
- non-private, "memorizing": every client's own data capped at 16 blocks and 30 steps a round, so
  the canaries are seen many times (what the audit finds when a model does memorize);
- non-private, memorizing harder: 4 blocks of each client's own data, 60 steps a round for 4
  rounds, LoRA on every linear layer (the canaries are most of the canary client's split and
  each is drawn about 25 times); at lr 1e-2 instead of 4e-3 the same run diverged (test ppl
  29,764; audit lower bound 0.00, 12 of 16 guesses right);
- sample-level DP-SGD (sigma 1, per-example clip 1, delta 1e-5), as in the privacy table;
- user-level DP-FedAvg (sigma 1.2, adaptive clipping from S = 0.05), as in the privacy table.
Writes bench/out/audit.md (one table row per run, for BENCHMARKS.md's privacy section).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import final, run_rows

CANARIES = ["audit.canaries=64", "audit.clients=1", "audit.seed=0", "strategy.name=fedit", "train.lr=0.004"]
ROWS = {
    "non-private": [],
    "non-private memorizing": ["data.max_train_blocks=16", "train.steps=30"],
    "non-private memorizing, all-linear": [
        "data.max_train_blocks=4",
        "train.steps=60",
        "rounds=4",
        "adapter.target_modules=all-linear",
    ],
    "dp-sgd sigma 1": ["train.dp_sgd.noise_multiplier=1.0", "train.dp_sgd.clip=1.0"],
    "dp-fedavg sigma 1.2": [
        "strategy.name=dp_fedavg",
        "strategy.inner=fedit",
        "strategy.noise_multiplier=1.2",
        "strategy.adaptive=true",
        "strategy.clip=0.05",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/lm.yaml")
    ap.add_argument("--out", default="bench/out/audit")
    a = ap.parse_args()
    out = Path(a.out)

    from fedtune.recipes.audit import audit_run

    res = run_rows(ROWS, a.config, CANARIES, out)
    lines = [
        "| run | accountant's epsilon (delta) | its bound for one canary | audit lower bound, 95 % | correct guesses "
        "| mean canary score in / out | mean test ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        d = out / "".join(c if c.isalnum() else "_" for c in row)
        audit = audit_run(d)
        acc = audit["accountant"]
        upper = "; ".join(f"{b['mechanism']} {b['epsilon']:.2f} ({b['delta']:g})" for b in acc) or "none (no DP)"
        canary = "; ".join(f"{b['canary_epsilon']:.2f} ({b['canary_delta']:.2g})" for b in acc) or "-"
        lower = f"{audit['epsilon_lower']:.2f} (delta {audit['delta']:g})"
        lower += "".join(
            f"; {b['epsilon_lower']:.2f} at {b['canary_delta']:.2g}" for b in acc if b["canary_delta"] != audit["delta"]
        )
        lines.append(
            f"| {row} | {upper} | {canary} | {lower} | {audit['correct']} of {audit['guesses']} "
            f"| {audit['mean_score_in']:.3f} / {audit['mean_score_out']:.3f} | {final(res[row]):.2f} |"
        )
    out.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Adapter kinds at an equal trainable-parameter budget, on the demo's instruction task.

    .venv/bin/python bench/adapters.py --count-only          # the budget matching alone (minutes)
    .venv/bin/python bench/adapters.py                       # every kind x (fedavg, local) x 2 lrs
    .venv/bin/python bench/adapters.py --kinds lora,dora --lrs 1 --out bench/out/adapters-smoke
    .venv/bin/python bench/adapters.py --kinds dora,smore --strategies fedavg   # a subset of the rows
    .venv/bin/python bench/adapters.py --lr-of fedavg     # local at the lr FedAvg's finished rows chose
    .venv/bin/python bench/adapters.py --kinds smore --strategies fedavg,local,comigs --lr-of fedavg

Task: configs/demo.yaml (SmolLM2-135M-Instruct, four parties, Dirichlet over four newsgroups) with
`evaluation.val: true`. Budget: LoRA r=8 on the demo's targets. How it is matched: for each kind,
every candidate size in CANDIDATES is injected into the real model (`build_adapted_model`, as a run
does) and its trainable parameters counted (the round-0 record's `trainable_parameters`); the
candidate closest to the budget is used, and the table says its count and ratio to the budget.
VeRA and IA3 cannot reach LoRA's count at a sensible size (that is their point; VeRA would need
r = 7296, whose shared projections cost 3x the base model's FLOPs a token): their rows say
so. Prompt tuning would need 800 virtual tokens (460,800 / 576) to reach the budget, six times the
demo's 128-token blocks in every forward: its candidates stop at 100 tokens, and its row says so.

Protocol, the same tuning budget for every kind: `--lrs` learning rates each (a factor 3 apart),
the one with the best final mean *validation* accuracy kept; reported at that lr: own-test accuracy
(mean / worst party), balanced accuracy on every party's test data (`ood`), MB moved, seconds of
the rounds (their training part in brackets: a personalizing strategy's final evaluation scores one
model per party, so its rounds take longer at the same training). Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runs import final, run_rows

CONFIG = "configs/demo.yaml"
BUDGET = ["adapter.kind=lora", "adapter.r=8"]
# kind -> (candidate sizes, each a list of overrides; learning rates)
CANDIDATES: dict[str, tuple[list[list[str]], list[float]]] = {
    "lora": ([BUDGET], [1e-3, 3e-3]),
    "rm_lora": ([["adapter.kind=rm_lora", "adapter.r=8"]], [1e-3, 3e-3]),
    "dora": ([["adapter.kind=dora", f"adapter.r={r}"] for r in (6, 7, 8)], [1e-3, 3e-3]),
    # VeRA's b, d are (d_out + r) a layer, so LoRA's count needs r = 7296; but every token then runs
    # through the shared [r, 576] A and B[:d_out]: 2 x 576 x 7296 + 2 x 7296 x d_out = 16.8 MFLOP for q
    # (11.2 for v: d_out 192), 0.84 GFLOP a token over 30 layers, about 3x the whole base model's
    # 2N = 0.27 GFLOP. The paper's sizes stop at r = 1024 (0.12 GFLOP a token): so does the bench.
    "vera": ([["adapter.kind=vera", f"adapter.r={r}"] for r in (256, 1024)], [3e-3, 1e-2]),
    "ia3": ([["adapter.kind=ia3"], ["adapter.kind=ia3", "adapter.target_modules=all-linear"]], [3e-3, 1e-2]),
    "loha": ([["adapter.kind=loha", f"adapter.r={r}"] for r in (2, 4, 6)], [1e-3, 3e-3]),
    "lokr": ([["adapter.kind=lokr", f"adapter.r={r}"] for r in (4, 8, 16)], [1e-3, 3e-3]),
    "prompt_tuning": (
        [["adapter.kind=prompt_tuning", f"adapter.num_virtual_tokens={n}"] for n in (20, 50, 100)],
        [1e-2, 3e-2],
    ),
    # SmolLM2: 30 layers x (key, value) x 192 (3 kv heads x 64) = 11,520 a position; 40 = LoRA r=8's 460,800
    "prefix_tuning": (
        [["adapter.kind=prefix_tuning", f"adapter.num_virtual_tokens={n}"] for n in (20, 40, 80)],
        [1e-2, 3e-2],
    ),
    "moe_lora": ([["adapter.kind=moe_lora", "adapter.experts=4", f"adapter.r={r}"] for r in (1, 2, 4)], [1e-3, 3e-3]),
    "smore": (
        [["adapter.kind=smore", f"adapter.r={r}", f"adapter.experts={e}"] for r in (2, 4) for e in (2, 4)],
        [1e-3, 3e-3],
    ),
}
STRATEGIES = ["fedavg", "local"]
# strategies beyond the default two, with their overrides: CoMiGS's preset 1G1S (one expert per level
# averaged, the rest and the routers kept by each party); each runs on the kinds its declared
# algebras accept (CoMiGS: the mixtures, MoE-LoRA and S'MoRE)
EXTRA = {"comigs": ["strategy.preset=1G1S"]}
COMMON = ["evaluation.val=true"]


def trainable(overrides: list[str]) -> int:
    """Trainable parameters of the adapter these overrides give, injected into the real model."""
    from fedtune.config import load_config
    from fedtune.engines.federation import build_adapted_model
    from fedtune.models.adapters import trainable_parameter_count
    from fedtune.models.load import load_tokenizer, resolve_model_dir

    cfg = load_config(CONFIG, [*overrides, "model.device=cpu"])
    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    model, _ = build_adapted_model(cfg, model_dir, {}, load_tokenizer(model_dir))
    return int(trainable_parameter_count(model))


def match(kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Each kind's candidate closest to the budget: {kind: {overrides, count, ratio, counts}}."""
    budget = trainable(BUDGET)
    out = {}
    for kind in kinds:
        counts = [(trainable(c), c) for c in CANDIDATES[kind][0]]
        count, best = min(counts, key=lambda x: abs(x[0] - budget))
        out[kind] = {"overrides": best, "count": count, "ratio": count / budget, "counts": [n for n, _ in counts]}
        print(f"{kind:9s} {count:>10,d} trainable ({count / budget:.2f} x budget {budget:,}) {best}", flush=True)
    return out


def score(r: dict[str, Any]) -> tuple[float, float]:
    acc, ppl = final(r, "val_mean_acc"), final(r, "mean_val_ppl")
    return (acc if acc is not None else -1.0, -(ppl if ppl is not None else 1e9))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/adapters")
    ap.add_argument("--kinds", default=",".join(CANDIDATES))
    ap.add_argument("--lrs", type=int, default=2, help="learning rates tried per kind and strategy (same for all)")
    ap.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="of " + ",".join([*STRATEGIES, *EXTRA]) + " (each on the kinds its declared algebras accept)",
    )
    ap.add_argument(
        "--lr-of",
        default=None,
        help="a strategy whose finished rows chose each kind's lr: the other strategies run at that lr alone",
    )
    ap.add_argument("--count-only", action="store_true", help="only the budget matching")
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in a.kinds.split(",") if k]
    strategies = [s for s in a.strategies.split(",") if s]
    matched = match(kinds)
    out.with_name(out.name + "-budget.json").write_text(json.dumps(matched, indent=1))
    if a.count_only:
        return

    def named(k: str, s: str, lr: float) -> tuple[str, list[str]]:
        extra = EXTRA.get(s, [])
        return f"{k} {s} lr {lr:g}", [*matched[k]["overrides"], f"strategy.name={s}", *extra, f"train.lr={lr}"]

    def applies(k: str, s: str) -> bool:
        from fedtune.strategies import STRATEGIES as REGISTERED
        from fedtune.strategies.base import algebra_problems

        return not algebra_problems(s, REGISTERED.get(s)().capabilities, k)

    lrs = {(k, s): CANDIDATES[k][1][: a.lrs] for k in kinds for s in strategies if applies(k, s)}
    how = f"{a.lrs} lr(s) per kind and strategy, chosen by final mean validation accuracy."
    if a.lr_of:  # the other strategies at the lr the finished rows of --lr-of chose
        done = run_rows(
            dict(named(k, a.lr_of, lr) for k in kinds for lr in CANDIDATES[k][1][: a.lrs]), CONFIG, COMMON, out, True
        )
        for k in kinds:
            cands = {lr: done[n] for lr in CANDIDATES[k][1][: a.lrs] if (n := named(k, a.lr_of, lr)[0]) in done}
            if len(cands) < a.lrs:
                raise SystemExit(f"{k}: the {a.lr_of} rows are not all finished in {out}; run them first")
            for s in strategies:
                if s != a.lr_of and applies(k, s):
                    lrs[(k, s)] = [max(cands, key=lambda lr: score(cands[lr]))]
        how = f"{a.lrs} lr(s) per kind for {a.lr_of}, chosen by final mean validation accuracy; the others at its lr."
    rows = dict(named(k, s, lr) for (k, s), lrs_ks in lrs.items() for lr in lrs_ks)
    res = run_rows(rows, CONFIG, COMMON, out)
    lines = [
        f"Budget: LoRA r=8 ({matched.get('lora', {}).get('count', '-')} trainable); {how}",
        "",
        "| kind | trainable (x budget) | strategy | lr | val acc | own-test acc (mean / worst) | balanced acc "
        "| MB moved | rounds s (training) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[str, Any] = {}

    def pct(x: Any) -> str:
        return f"{100 * x:.1f} %" if isinstance(x, int | float) else "-"

    for k in kinds:
        for s in [s for s in strategies if applies(k, s)]:
            cands = {lr: res[named(k, s, lr)[0]] for lr in lrs[(k, s)]}
            best = max(cands, key=lambda lr: score(cands[lr]))
            r = cands[best]
            row = {
                "lr": best,
                "val_acc": score(r)[0],
                "acc": final(r, "mean_acc"),
                "worst_acc": final(r, "worst_acc"),
                "balanced_acc": final(r, "ood_mean_acc"),
                "mb": (final(r, "cum_bytes") or 0) / 1e6,
                "rounds_s": r["summary"].get("round_seconds"),
                "train_s": r["summary"].get("train_seconds"),
            }
            table[f"{k} {s}"] = row
            lines.append(
                f"| {k} | {matched[k]['count']:,} ({matched[k]['ratio']:.2f}) | {s} | {best:g} | {pct(row['val_acc'])} "
                f"| {pct(row['acc'])} / {pct(row['worst_acc'])} | {pct(row['balanced_acc'])} | {row['mb']:.1f} "
                f"| {row['rounds_s'] or 0:.0f} ({row['train_s'] or 0:.0f}) |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

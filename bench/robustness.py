"""Robustness: mean test perplexity with 0/10/20/30 % sign-flip attackers for FedAvg and each robust
aggregator, and with 0/20/50 % dropped clients for FedAvg and SAFARI.

    .venv/bin/python bench/robustness.py                              # real task, 10 clients
    .venv/bin/python bench/robustness.py --config configs/tiny.yaml   # a smoke run

Clients: 5 20-Newsgroups topics x 2 clients each (`partition.clients_per_label=2`, 60 documents
per topic, 2 rounds x 3 steps, 6 test blocks per client; 37 runs, about 85 minutes alone on 2
cores), so 10/20/30 % is 1/2/3 attackers (sign flip, scale 4). Robust rules assume f = 3 and work
on the transmitted A, B deltas (all clients start each round from the same factors); Bristle
scores candidates on 2 validation blocks per client, all of them (`bristle`) or only the 7
closest to the current model (`bristle_keep7`, its prioritizer). Writes bench/out/robustness.md
and bench/out/robustness.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import final as runs_final
from runs import run_rows

RULES = {
    "fedavg": ["strategy.name=fedavg"],
    "krum": ["strategy.name=robust", "strategy.rule=krum", "strategy.f=3"],
    "multikrum": ["strategy.name=robust", "strategy.rule=multikrum", "strategy.f=3"],
    "median": ["strategy.name=robust", "strategy.rule=median"],
    "trimmed_mean": ["strategy.name=robust", "strategy.rule=trimmed_mean", "strategy.trim=0.3"],
    "norm_bound": ["strategy.name=robust", "strategy.rule=norm_bound"],
    "bristle": ["strategy.name=bristle"],
    # with its prioritizer: score only the 7 updates closest to the current model (n - f)
    "bristle_keep7": ["strategy.name=bristle", "strategy.keep=7"],
}
ATTACK = [0.0, 0.1, 0.2, 0.3]
DROP = [0.0, 0.2, 0.5]


def rows(tiny: bool) -> tuple[dict[str, list[str]], list[str]]:
    data = (
        [
            "data.labels=[email, asyncio, xml, multiprocessing, unittest]",
            "partition.clients_per_label=2",
            "data.max_docs_per_label=8",
        ]
        if tiny
        else [
            "data.labels=[comp.graphics, rec.sport.hockey, sci.med, talk.politics.guns, sci.space]",
            "partition.clients_per_label=2",
            "data.max_docs_per_label=60",
            "data.max_test_blocks=6",
            "train.steps=3",
            "rounds=2",
        ]
    )
    out: dict[str, list[str]] = {}
    # the target check first (attack-free and 30 %), then 10/20 %, then dropouts
    for level in ([0.0, 0.3], [0.1, 0.2]):
        for rule, over in RULES.items():
            for a in level:
                atk = ["attack.kind=sign_flip", f"attack.fraction={a}", "attack.scale=4"] if a else []
                out[f"{rule} attack {a:.0%}"] = [*over, *atk]
    for strat in ("fedavg", "safari"):
        for d in DROP:
            if strat == "fedavg" and d == 0:
                continue  # the same run as "fedavg attack 0%"
            out[f"{strat} dropout {d:.0%}"] = [f"strategy.name={strat}", f"sampling.dropout={d}"]
    return out, data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/lm.yaml")
    ap.add_argument("--out", default="bench/out/robustness")
    ap.add_argument("--existing", action="store_true", help="only tabulate the rows already finished")
    a = ap.parse_args()
    table, common = rows("tiny" in a.config)
    res = run_rows(table, a.config, common, Path(a.out), only_finished=a.existing)
    res["fedavg dropout 0%"] = res["fedavg attack 0%"]

    def final(r: dict | None, key: str = "mean_ppl") -> float:
        return float("nan") if r is None else runs_final(r, key)

    clean = final(res["fedavg attack 0%"])
    lines = ["| aggregator | " + " | ".join(f"{x:.0%} attackers" for x in ATTACK) + " | 30 % vs attack-free FedAvg |"]
    lines.append("|" + "---|" * (len(ATTACK) + 2))
    for rule in RULES:
        vals = [final(res.get(f"{rule} attack {x:.0%}")) for x in ATTACK]
        lines.append(
            f"| {rule} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {100 * (vals[-1] / clean - 1):+.1f} % |"
        )
    lines += ["", "| strategy | " + " | ".join(f"{d:.0%} dropped" for d in DROP) + " |", "|" + "---|" * (len(DROP) + 1)]
    for strat in ("fedavg", "safari"):
        vals = [final(res.get(f"{strat} dropout {d:.0%}")) for d in DROP]
        lines.append(f"| {strat} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    out = Path(a.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule in RULES:
        ax.plot([100 * x for x in ATTACK], [final(res.get(f"{rule} attack {x:.0%}")) for x in ATTACK], "o-", label=rule)
    ax.axhline(clean * 1.05, ls=":", color="gray", label="attack-free FedAvg + 5 %")
    ax.set_xlabel("sign-flip attackers (% of clients)")
    ax.set_ylabel("mean test perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()

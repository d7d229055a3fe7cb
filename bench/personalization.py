"""Personalization on the real task: every client's own model, in and out of distribution.

    .venv/bin/python bench/personalization.py                 # all rows, about 30 min on 2 cores
    .venv/bin/python bench/personalization.py --rows local,fedavg

Task: configs/lm.yaml (SmolLM2-135M-Instruct, bf16) with 8 clients, two per 20-Newsgroups
topic (comp.graphics, rec.sport.hockey, sci.med, talk.politics.guns; `partition.clients_per_label=2`),
3 rounds x 4 local steps of 4 x 128 tokens. In-distribution = each client's own test split; out-of-distribution
(OOD) = the same number of test blocks from every client (`evaluation.ood`). LoRA rows: r=8 on
q,v; mixture rows (CoMiGS): 2 LoRA experts (r=8) on every MLP with a token router.
Writes bench/out/personalization/<row>/ run dirs, bench/out/personalization.md (tables) and
bench/out/personalization.png (per-client ppl) and bench/out/personalization-trust.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMON = [
    "partition.clients_per_label=2",
    "data.max_docs_per_label=100",
    "data.max_test_blocks=4",
    "train.steps=4",
    "evaluation.ood=true",
    "evaluation.every=3",
]
MOE = ["adapter.kind=moe_lora", "adapter.experts=2", "adapter.top_k=2", "strategy.name=comigs"]
ROWS: dict[str, list[str]] = {
    "local": ["strategy.name=local"],
    "fedavg": ["strategy.name=fedavg"],
    "comigs 1G1S": [*MOE, "strategy.preset=1G1S"],
    "comigs 2G": [*MOE, "strategy.preset=2G"],
    "comigs 2S": [*MOE, "strategy.preset=2S"],
    "pcl weights": ["strategy.name=pcl", "strategy.trust=weights"],
    "pcl val": ["strategy.name=pcl", "strategy.trust=val"],
    "pcl predictions": ["strategy.name=pcl", "strategy.trust=predictions"],
    "tac k=4": ["strategy.name=tac", "strategy.clusters=4"],
    # no server: each peer averages with its ring neighbours / with everyone (= uniform FedAvg)
    "gossip ring": ["strategy.name=gossip", "strategy.topology=ring"],
    "gossip complete": ["strategy.name=gossip", "strategy.topology=complete"],
}
PERSONAL = [r for r in ROWS if r not in ("local", "fedavg")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/out/personalization")
    args = ap.parse_args()

    from runs import run_rows

    out = Path(args.out)
    rounds = [f"rounds={args.rounds}", f"evaluation.every={args.rounds}"]
    chosen = {row: [*ROWS[row], *rounds] for row in args.rows.split(",")}
    runs = run_rows(chosen, "configs/lm.yaml", COMMON, out)
    text = tables(runs)
    out.with_suffix(".md").write_text(text)
    print(text)
    plot_clients(runs, out.with_suffix(".png"))
    plot_trust(runs, Path(f"{out}-trust.png"))


def final(recs: list[dict], key: str) -> dict[str, float]:
    last = max(r["round"] for r in recs)
    return {r["client"]: r[key] for r in recs if r["round"] == last and r["client"] and key in r}


def tables(runs: dict) -> str:
    any_run = next(iter(runs.values()))["records"]
    clients = sorted(final(any_run, "test_ppl"))
    base = {r["client"]: r for r in any_run if r["round"] == 0 and r["client"]}
    lines = ["### In distribution: each client's model on its own test split (ppl)", ""]
    lines.append("| method | " + " | ".join(clients) + " | mean | OOD mean | MB moved | wall s |")
    lines.append("|" + "---|" * (len(clients) + 5))
    lines.append(
        "| base model | "
        + " | ".join(f"{base[c]['test_ppl']:.1f}" for c in clients)
        + f" | {sum(base[c]['test_ppl'] for c in clients) / len(clients):.1f}"
        + f" | {sum(base[c]['ood_ppl'] for c in clients) / len(clients):.1f} | 0 | - |"
    )
    for row, run in runs.items():
        ind, ood = final(run["records"], "test_ppl"), final(run["records"], "ood_ppl")
        s = run["summary"]
        lines.append(
            f"| {row} | "
            + " | ".join(f"{ind[c]:.1f}" for c in clients)
            + f" | {sum(ind.values()) / len(ind):.1f} | {sum(ood.values()) / len(ood):.1f}"
            + f" | {s['final']['cum_bytes'] / 1e6:.1f} | {s['wall_seconds']:.0f} |"
        )
    if "local" in runs and "fedavg" in runs:
        loc, avg = final(runs["local"]["records"], "test_ppl"), final(runs["fedavg"]["records"], "test_ppl")
        best = {c: min(loc[c], avg[c]) for c in clients}
        lines += ["", "### Goal: at least as good as the better of Local and FedAvg on every client", ""]
        lines += [
            "| method | clients at or below min(Local, FedAvg) | worst gap to min(Local, FedAvg) |",
            "|---|---|---|",
        ]
        for row in (r for r in runs if r in PERSONAL):
            ind = final(runs[row]["records"], "test_ppl")
            ok = sum(ind[c] <= best[c] for c in clients)
            gap = max(100 * (ind[c] / best[c] - 1) for c in clients)
            lines.append(f"| {row} | {ok} / {len(clients)} | {gap:+.1f} % |")
    trust_rows = [r for r in runs if trust_of(runs[r]["records"])]
    if trust_rows:
        lines += ["", "### PCL trust: does it recover the topics? (final round)", ""]
        head = "| method | clients whose largest off-diagonal trust is the same-topic peer "
        head += "| mean share of off-diagonal trust on the same-topic peer (chance 1/7) |"
        lines += [head, "|---|---|---|"]
        for row in trust_rows:
            ids, w = trust_of(runs[row]["records"])
            hits, shares = 0, []
            for i, c in enumerate(ids):
                off = {d: w[i][j] for j, d in enumerate(ids) if d != c}
                peer = next(d for d in off if d.rsplit("-", 1)[0] == c.rsplit("-", 1)[0])
                hits += max(off, key=off.get) == peer
                shares.append(off[peer] / max(sum(off.values()), 1e-30))
            lines.append(f"| {row} | {hits} / {len(ids)} | {sum(shares) / len(shares):.3f} |")
    gossip = [r for r in runs if r.startswith("gossip")]
    if gossip:
        lines += ["", "### Gossip: how far apart the peers' models are (final round)", ""]
        lines += ["| method | consensus distance | spectral gap | messages a round |", "|---|---|---|---|"]
        for row in gossip:
            last = [r for r in runs[row]["records"] if r["client"] is None and "consensus_distance" in r][-1]
            gap = last.get("spectral_gap", float("nan"))
            lines.append(f"| {row} | {last['consensus_distance']:.4f} | {gap:.3f} | {last['gossip_messages']} |")
    tac = [r for r in runs if r.startswith("tac")]
    for row in tac:
        last = [r for r in runs[row]["records"] if r["client"] is None and "clusters" in r][-1]
        lines += ["", f"TAC clusters after the last round ({row}): `{json.dumps(last['clusters'])}`"]
    return "\n".join(lines) + "\n"


def trust_of(recs: list[dict]) -> tuple[list[str], list[list[float]]] | None:
    rounds = [r for r in recs if r["client"] is None and "trust" in r]
    return (rounds[-1]["trust_clients"], rounds[-1]["trust"]) if rounds else None


def plot_clients(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = sorted(final(next(iter(runs.values()))["records"], "test_ppl"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(runs)
    for k, (row, run) in enumerate(runs.items()):
        ind = final(run["records"], "test_ppl")
        axes[0].bar([i + k * width for i in range(len(clients))], [ind[c] for c in clients], width, label=row)
        ood = final(run["records"], "ood_ppl")
        axes[1].bar(k, sum(ood.values()) / len(ood))
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(clients))], clients, rotation=30, fontsize=7)
    axes[0].set_ylabel("test perplexity, own domain (lower is better)")
    axes[0].set_ylim(bottom=min(min(final(r["records"], "test_ppl").values()) for r in runs.values()) * 0.9)
    axes[0].legend(fontsize=7, ncol=3)
    axes[1].set_xticks(range(len(runs)), list(runs), rotation=60, fontsize=7)
    axes[1].set_ylabel("mean OOD perplexity (mixture of all domains)")
    axes[1].set_ylim(bottom=min(axes[1].get_ylim()[1] * 0.8, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_trust(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if trust_of(runs[r]["records"])]
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(4.3 * len(rows), 4))
    for ax, row in zip(axes if len(rows) > 1 else [axes], rows):
        ids, w = trust_of(runs[row]["records"])
        im = ax.imshow(w, cmap="viridis")
        ax.set_xticks(range(len(ids)), ids, rotation=90, fontsize=6)
        ax.set_yticks(range(len(ids)), ids, fontsize=6)
        ax.set_title(row, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

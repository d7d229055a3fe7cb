"""Without a server: gossip over several graphs, MoDeST, Bristle under attack, versus FedAvg
(a server) and local training, and the real swarm against the simulator.

    .venv/bin/python bench/decentralized.py                       # SmolLM2, the demo's instruction task (hours)
    # what BENCHMARKS.md reports for SmolLM2: the demo's 4 parties (fp32, no OOD test: the swarm has none),
    # then the graphs that need more peers on 9
    C="--set model.dtype=float32 --set train.bf16=false --set evaluation.ood=false"
    .venv/bin/python bench/decentralized.py --out bench/out/decentralized-smollm2 $C --rows "local;fedavg;\
gossip ring;gossip complete;gossip matching;modest;pcl ring, val trust;gossip ring, 25 % attackers;\
bristle ring, 25 % attackers;swarm gossip ring;diloco"
    .venv/bin/python bench/decentralized.py --out bench/out/decentralized-smollm2-9 $C \
        --set partition.num_clients=9 --set partition.min_docs=10 \
        --rows "fedavg;gossip ring;gossip torus;gossip expander;local"
    .venv/bin/python bench/decentralized.py --config configs/tiny.yaml --out bench/out/decentralized-tiny \
        --set partition.kind=dirichlet --set partition.num_clients=9 --set partition.alpha=1.0 \
        --set partition.min_docs=2 --set data.max_docs_per_label=24 --set rounds=4

Every row runs the config's rounds, local steps and learning rate (the same budget for every
method); rows differ only in the strategy block (and the attack for the attacked rows):
- `local`, `fedavg`: no communication, and a server averaging everyone; `diloco`: a server
  averaging everyone with DiLoCo's outer Nesterov step (lr 0.7, momentum 0.9), the global baseline;
- `gossip ring | torus | expander | complete | matching`: decentralized FedAvg (each peer trains,
  then averages with its graph neighbours, Metropolis-Hastings weights); `torus` a 3 x 3 torus
  (9 peers: `--set partition.num_clients=9`), `expander` a random 4-regular graph, `matching` a
  fresh random matching each round (time-varying);
- `modest`: MoDeST's seeded sample of trainers and aggregators each round;
- `pcl ring, val trust`: PCL's trust mix per peer (`pcl_p2p`), each receiver weighing its ring
  neighbours by -perplexity on its own validation blocks;
- `gossip ring, 25 % attackers` and `bristle ring, 25 % attackers`: a quarter of the peers send
  sign-flipped updates (x4); Bristle's receivers score what they receive on their own data;
- `swarm gossip ring`: the same `gossip ring` row as real peer processes over hivemind on
  loopback (`engine.name: p2p-local`), its wall time against the simulator's.

Reported per row (last round): mean and worst own-test accuracy (instruction data) or perplexity
of the honest peers, consensus distance of the last round's peers (decentralized rows), bytes
per peer per round (the real payloads: sent + received, averaged over the peers that took part),
seconds of the rounds and of the whole run. Writes OUT.md, OUT.json and OUT.png (each clean graph
row's topology, peers coloured by their own-test metric, beside consensus distance over rounds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from runs import run_rows

ATTACK = ["attack.kind=sign_flip", "attack.scale=4", "attack.fraction=0.25"]
SIM_ROWS: dict[str, list[str]] = {
    "local": ['strategy={"name": "local"}'],
    "fedavg": ['strategy={"name": "fedavg"}'],
    "diloco": ['strategy={"name": "diloco"}'],
    "gossip ring": ['strategy={"name": "gossip", "topology": "ring"}'],
    "gossip torus": ['strategy={"name": "gossip", "topology": "torus", "rows": 3}'],
    "gossip expander": ['strategy={"name": "gossip", "topology": "regular", "degree": 4}'],
    "gossip complete": ['strategy={"name": "gossip", "topology": "complete"}'],
    "gossip matching": ['strategy={"name": "gossip", "topology": "matching"}'],
    "modest": ['strategy={"name": "modest"}'],
    "pcl ring, val trust": ['strategy={"name": "pcl_p2p", "topology": "ring", "trust": "val"}'],
    "gossip ring, 25 % attackers": ['strategy={"name": "gossip", "topology": "ring"}', *ATTACK],
    "bristle ring, 25 % attackers": ['strategy={"name": "bristle_p2p", "topology": "ring", "keep": 2}', *ATTACK],
}


def numbers(result: dict[str, Any]) -> dict[str, Any]:
    recs = result["records"]
    last = max(r["round"] for r in recs)
    bad = set(next(r for r in recs if r["round"] == 0 and r["client"] is None).get("attackers", []))
    peers = [r for r in recs if r["round"] == last and r["client"] and r["client"] not in bad]
    key = "test_acc" if peers and all("test_acc" in r for r in peers) else "test_ppl"
    vals = [r[key] for r in peers if key in r]
    moved = [r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in recs if r["client"] and r["round"] > 0]
    took = [r for r in recs if r["client"] and r["round"] > 0 and (r.get("bytes_up") or r.get("bytes_down"))]
    summary = result["summary"]
    final = summary["final"]
    return {
        "metric": key,
        "mean": sum(vals) / len(vals) if vals else None,
        "worst": (min(vals) if key == "test_acc" else max(vals)) if vals else None,
        "consensus": final.get("consensus_distance"),
        "bytes_per_peer_round": sum(moved) / len(took) if took else 0.0,
        "rounds_s": summary.get("round_seconds"),
        "wall_s": summary.get("wall_seconds"),
    }


def run_swarm_row(config: str, common: list[str], over: list[str], out: Path) -> dict[str, Any]:
    """The `gossip ring` row as a local swarm of peer processes (a finished one is reused)."""
    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.recipes.swarm import run_swarm

    d = out / "swarm_gossip_ring"
    if not (d / "summary.json").exists():
        swarm = ["engine.name=p2p-local", "engine.join_timeout=600", f"output_dir={d}", "name=swarm"]
        cfg = load_config(config, [*common, *over, *swarm])
        t0 = time.perf_counter()
        run_swarm(cfg, resume=False, overwrite=True, console=Console(stderr=True))
        (d / "bench_wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((d / "summary.json").read_text())
    return {"records": recs, "summary": summary}


def plot(res: dict[str, dict[str, Any]], rows: dict[str, list[str]], path: Path) -> None:
    """The graph of each clean gossip-like row (ring, torus, expander, complete, the last round's
    matching; PCL's ring) with every honest peer coloured by its last-round own-test metric, beside
    the consensus distance of every decentralized row over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    from fedtune.topology import TopologySpec, build_graph

    graphs = []
    for row, r in res.items():
        over = rows.get(row, [])  # the swarm row is not in `rows`: its graph is the simulator's ring
        strat = next((json.loads(o.split("=", 1)[1]) for o in over if o.startswith("strategy=")), {})
        if "topology" in strat and "attackers" not in row:
            graphs.append((row, strat, r["records"]))
    fig, axes = plt.subplots(1, len(graphs) + 1, figsize=(3.2 * (len(graphs) + 1), 3.4), squeeze=False)
    key = "test_acc" if all(any("test_acc" in x for x in recs) for _, _, recs in graphs) else "test_ppl"
    for ax, (row, strat, recs) in zip(axes[0], graphs, strict=False):
        last = max(x["round"] for x in recs)
        score = {x["client"]: x[key] for x in recs if x["round"] == last and x["client"] and key in x}
        ids = sorted({x["client"] for x in recs if x["client"]})
        spec = TopologySpec(kind=strat["topology"], degree=strat.get("degree", 4), rows=strat.get("rows"))
        g = build_graph(spec, ids, 0, last)
        pos = nx.circular_layout(sorted(g.nodes))
        vals = [score.get(n, float("nan")) for n in g.nodes]
        nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.5)
        nodes = nx.draw_networkx_nodes(g, pos, ax=ax, node_color=vals, cmap="viridis", vmin=0.0, vmax=1.0)
        labels = {n: f"{100 * v:.0f}" if key == "test_acc" else f"{v:.2f}" for n, v in zip(g.nodes, vals, strict=True)}
        nx.draw_networkx_labels(g, pos, labels, ax=ax, font_size=7, font_color="white")
        ax.set_title(f"{row}\n(last round{' graph' if spec.time_varying else ''})", fontsize=8)
        ax.axis("off")
    if graphs:
        fig.colorbar(nodes, ax=axes[0][len(graphs) - 1], fraction=0.046, label=f"own-test {key}")
    ax = axes[0][-1]
    for row, r in res.items():
        pts = [
            (x["round"], x["consensus_distance"])
            for x in r["records"]
            if x["client"] is None and "consensus_distance" in x
        ]
        if pts and not row.startswith("swarm"):
            ax.plot(*zip(*pts, strict=True), marker="o", label=row)
    ax.set_yscale("symlog", linthresh=0.1)  # 0 (complete graph, MoDeST) to the attacked rows' distances
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("consensus distance (after mixing)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="bench/out/decentralized")
    ap.add_argument("--set", action="append", default=[], help="an override for every row (key=value)")
    ap.add_argument("--no-swarm", action="store_true", help="skip the real swarm row")
    ap.add_argument("--report-only", action="store_true", help="run nothing: tabulate and plot the finished rows")
    ap.add_argument(
        "--rows",
        help="rows to run, separated by ; in this order (default: all); name 'swarm gossip ring' to run the swarm",
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [r.strip() for r in a.rows.split(";")] if a.rows else [*SIM_ROWS, "swarm gossip ring"]
    if unknown := [r for r in names if r not in SIM_ROWS and r != "swarm gossip ring"]:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; the rows are {[*SIM_ROWS, 'swarm gossip ring']}")
    res = run_rows({r: SIM_ROWS[r] for r in names if r in SIM_ROWS}, a.config, a.set, out, a.report_only)
    done = (out / "swarm_gossip_ring" / "summary.json").exists()
    if "swarm gossip ring" in names and not a.no_swarm and (done or not a.report_only):
        res["swarm gossip ring"] = run_swarm_row(a.config, a.set, SIM_ROWS["gossip ring"], out)
    table = {row: numbers(r) for row, r in res.items()}
    metric = next(iter(table.values()))["metric"]
    fmt = (lambda x: f"{100 * x:.1f} %") if metric == "test_acc" else (lambda x: f"{x:.2f}")
    lines = [
        f"Config {a.config} {' '.join(a.set)}; honest peers' last-round own-test {metric}.",
        "",
        f"| row | mean {metric} | worst {metric} | consensus distance | bytes / peer / round | rounds s | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, t in table.items():
        cons = "-" if t["consensus"] is None else f"{t['consensus']:.4f}"
        mean = "-" if t["mean"] is None else fmt(t["mean"])
        worst = "-" if t["worst"] is None else fmt(t["worst"])
        lines.append(
            f"| {row} | {mean} | {worst} | {cons} | {t['bytes_per_peer_round']:,.0f} | {t['rounds_s'] or 0:.1f} "
            f"| {t['wall_s'] or 0:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    plot(res, SIM_ROWS, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

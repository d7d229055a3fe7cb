"""Scale: registered clients N = 100, 1,000, 10,000 at a fixed 10 sampled clients per round. Only
the sampled (and the 10 watched, `evaluation.clients: 10`) clients should cost anything.

    .venv/bin/python bench/scale.py                      # tiny model rows, personal state, Flower
    .venv/bin/python bench/scale.py --rows smollm2       # the SmolLM2 rows only
    .venv/bin/python bench/scale.py --rows peers         # gossip (no server), N = 100 and 1,000 peers

Data: Friends transcripts (61,510 lines), `partition.kind: iid` into N clients, blocks of 8
tokens, 30 % of each client's lines for test; 3 rounds x 4 local steps (batch 4). Each row is a
fresh `fedtune run` process. Measured: time until round 0 is written (process start to the first
metrics line: data, partition, checks, model, the baseline evaluation), mean seconds per round
(from the records), peak RSS of the process tree (psutil, sampled every 0.1 s), disk used by the
run directory, metrics.jsonl size. Personal-state rows: PCL, TAC and CoMiGS (1G1S) with N = 100
against N = 2 (the state store holds at most 64 clients in memory). Flower row: the tiny N = 1,000
run on Flower's simulation runtime (Ray, 1,000 virtual SuperNodes), compared record by record with
the in-process run. Writes OUT.md and OUT.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from engines import tree_rss

DATA = [
    "data.source=friends", "data.labels=null", "data.max_docs_per_label=null", "data.block_size=8",
    "data.val_fraction=0", "data.test_fraction=0.3", "partition.kind=iid", "evaluation.clients=10",
    "evaluation.every=1", "evaluation.ood=false", "rounds=3", "train.steps=4",
]  # fmt: skip
TINY = ["configs/tiny.yaml", "data.max_train_blocks=64", "data.max_test_blocks=8"]
# SmolLM2's tokenizer makes ~3x fewer tokens of a line than the tiny model's bytes: at N = 10,000
# (six lines a client) 148 clients would hold no 8-token test block with 30 % for test, and at
# seed 0 one client keeps only "leave", "Okay.", "Okay" for training, which fedtune refuses (as it
# must); half of each client's lines test, and seed 1
SMOL = ["configs/demo.yaml", "data.max_train_blocks=64", "data.max_test_blocks=8",
        "evaluation.generate=0", "data.test_fraction=0.5", "seed=1"]  # fmt: skip
PEERS = ["strategy.name=gossip", "strategy.fanout=2"]  # fanout: the epidemic topology's s
PERSONAL = {
    "pcl": ["strategy.name=pcl"],
    "tac": ["strategy.name=tac"],
    "comigs 1G1S": ["strategy.name=comigs", "strategy.preset=1G1S", "adapter.kind=moe_lora"],
}


def rows(which: str) -> dict[str, tuple[list[str], int]]:
    """{row: (config + overrides, N)}."""
    out: dict[str, tuple[list[str], int]] = {}
    if which in ("all", "tiny"):
        out |= {f"tiny fedavg N={n:,}": ([*TINY, "strategy.name=fedavg"], n) for n in (100, 1_000, 10_000)}
        out |= {f"tiny {m} N={n}": ([*TINY, *o], n) for m, o in PERSONAL.items() for n in (2, 100)}
        out["tiny fedavg N=1,000 flower-sim"] = ([*TINY, "strategy.name=fedavg", "engine.name=flower-sim"], 1_000)
    if which in ("all", "peers"):  # serverless: the same sample of 10, each peer's model in its own state
        for topo, mixing in (("ring", "metropolis"), ("epidemic", "push_sum")):  # epidemic is directed
            topo_over = [*TINY, *PEERS, f"strategy.topology={topo}", f"strategy.mixing={mixing}"]
            out |= {f"tiny gossip {topo} N={n:,}": (topo_over, n) for n in (100, 1_000)}
    if which in ("all", "smollm2"):
        out |= {f"smollm2 fedavg N={n:,}": ([*SMOL, "strategy.name=fedavg"], n) for n in (100, 10_000)}
        out |= {f"smollm2 {m} N={n}": ([*SMOL, *o], n) for m, o in PERSONAL.items() for n in (2, 100)}
    return out


def measure(config: str, over: list[str], run_dir: Path) -> dict[str, Any]:
    args = [str(Path(sys.executable).parent / "fedtune"), "run", config, "--no-progress", "--overwrite"]
    for o in over:
        args += ["--set", o]
    metrics = run_dir / "metrics.jsonl"
    shutil.rmtree(run_dir, ignore_errors=True)  # an old metrics.jsonl would read as round 0 at once
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, first = [0], [0.0]

    def watch() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(p))
            if not first[0] and metrics.exists() and metrics.stat().st_size > 0:
                first[0] = time.perf_counter() - t0
            time.sleep(0.1)

    th = threading.Thread(target=watch)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    rounds = [r["wall_seconds"] for r in recs if r["client"] is None and r["round"] > 0]
    return {
        "first_round_s": first[0],
        "round_s": sum(rounds) / len(rounds),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": peak[0] / 2**20,
        "disk_mb": sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20,
        "metrics_kb": metrics.stat().st_size / 1024,
        "metrics_lines": len(recs),
        "final_mean_ppl": [r for r in recs if r["client"] is None][-1].get("mean_ppl"),
        "records": recs,
    }


def same_numbers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Largest relative difference of any numeric non-time field between two runs' records
    (inf when they hold different (round, client) records)."""
    ka = {(r["round"], r["client"]): r for r in a}
    kb = {(r["round"], r["client"]): r for r in b}
    if set(ka) != set(kb):
        return float("inf")
    worst = 0.0
    for k, ra in ka.items():
        for f, v in ra.items():
            w = kb[k].get(f)
            if isinstance(v, float) and isinstance(w, float) and "second" not in f:
                worst = max(worst, abs(v - w) / max(abs(w), 1e-12))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="all", choices=["all", "tiny", "peers", "smollm2"])
    ap.add_argument("--out", default="bench/out/scale")
    a = ap.parse_args()
    out = Path(a.out)
    res_path = out.with_suffix(".json")
    res: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {}
    for row, (over, n) in rows(a.rows).items():
        config, *sets = over
        d = out / "".join(c if c.isalnum() else "_" for c in row)
        sample = f"sampling.fraction={min(1.0, 10 / n)}"
        res[row] = measure(config, [*DATA, *sets, sample, f"partition.num_clients={n}", f"output_dir={d}"], d)
        print(row, {k: round(v, 2) for k, v in res[row].items() if isinstance(v, float)}, flush=True)
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(res))
    lines = [
        "| run | to round 0 s | s / round | peak RSS MB | disk MB | metrics KB (lines) | final mean ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, r in res.items():
        lines.append(
            f"| {row} | {r['first_round_s']:.1f} | {r['round_s']:.2f} | {r['peak_rss_mb']:,.0f} | "
            f"{r['disk_mb']:.2f} | {r['metrics_kb']:.1f} ({r['metrics_lines']}) | {r['final_mean_ppl']:.2f} |"
        )
    flw, ref = res.get("tiny fedavg N=1,000 flower-sim"), res.get("tiny fedavg N=1,000")
    if flw and ref:
        lines += ["", f"Flower vs in-process (N = 1,000): largest relative difference of any record field "
                  f"{same_numbers(flw['records'], ref['records']):.2e}"]  # fmt: skip
    # (label, the large row, the small row, the ratio target, whether round 0's time has a target)
    pairs = [(f"gossip {t}: N = 1,000 vs 100 peers", f"tiny gossip {t} N=1,000", f"tiny gossip {t} N=100", 1.3, False)
             for t in ("ring", "epidemic")]  # fmt: skip
    pairs += [(f"{m}: N = 10,000 vs 100", f"{m} fedavg N=10,000", f"{m} fedavg N=100", 1.2, True)
              for m in ("tiny", "smollm2")]  # fmt: skip
    for label, big_row, small_row, target, first in pairs:
        big, small = res.get(big_row), res.get(small_row)
        if big and small:
            lines.append(
                f"\n{label}: s / round x{big['round_s'] / small['round_s']:.2f}, "
                f"peak RSS x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f} (targets <= {target})"
                + (f"; round 0 after {big['first_round_s']:.1f} s (target < 60)" if first else "")
            )
    for model in ("tiny", "smollm2"):
        for m in PERSONAL:
            hi, lo = res.get(f"{model} {m} N=100"), res.get(f"{model} {m} N=2")
            if hi and lo:
                lines.append(f"{model} {m}: peak RSS N = 100 / N = 2 = x{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f} "
                             "(target <= 1.5)")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The same federated work in-process, on Flower's simulation runtime and on Flower's deployment
engine (SuperLink + SuperNodes as processes, TLS, loopback): wall time per round and peak memory.

    .venv/bin/python bench/engines.py                       # SmolLM2, 2 clients, 2 rounds
    .venv/bin/python bench/engines.py --model tiny          # quick

Peak memory is the peak RSS summed over the process tree, sampled every 0.2 s (psutil).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ENGINES = {
    "inprocess": ["run", "--no-progress", "--overwrite"],
    "flower-sim": ["run", "--no-progress", "--overwrite", "--set", "engine.name=flower-sim"],
    "flower-deploy (TLS)": ["deploy"],
}


def tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    root = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(root))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{out.decode()[-3000:]}")
    return time.perf_counter() - t0, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/out/engines")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    common = [
        "configs/lm.yaml",
        "--set",
        f"model.name={a.model}",
        "--set",
        f"rounds={a.rounds}",
        "--set",
        "data.labels=[sci.med, rec.sport.hockey]",
        "--set",
        "train.steps=4",
    ]
    if a.model == "tiny":
        common = ["configs/tiny.yaml", "--set", f"rounds={a.rounds}", "--set", "data.labels=[email, json]"]
    rows = []
    for name, args in ENGINES.items():
        d = out / name.split()[0]
        extra = ["--set", f"output_dir={d}"]
        if name.startswith("flower-deploy"):
            extra += ["--work", str(out / "deploy-work")]
        wall, peak = run([args[0], *common, *extra, *args[1:]])
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in recs if r["client"] is None and r["round"] > 0]
        per_round = sum(r["train_seconds"] + r["aggregate_seconds"] for r in rounds) / len(rounds)
        rows.append((name, per_round, wall, peak / 2**30, rounds[-1]["mean_ppl"]))
        print(rows[-1], flush=True)
    lines = [
        "| engine | s per round (train + aggregate) | total wall s (start-up, eval included) "
        "| peak RSS GiB (process tree) | final mean ppl |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {r:.1f} | {w:.1f} | {m:.2f} | {p:.2f} |" for n, r, w, m, p in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

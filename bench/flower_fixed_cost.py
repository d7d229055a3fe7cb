"""The fixed cost every Flower deployment message pays (issue #32), measured and split.

    flock /tmp/heavy.lock .venv/bin/python bench/flower_fixed_cost.py imports --label after
    flock /tmp/heavy.lock .venv/bin/python bench/flower_fixed_cost.py deploy --label after --steps 4
    flock /tmp/heavy.lock .venv/bin/python bench/flower_fixed_cost.py deploy --label curve --light --rounds 1 \
        --steps 4 10 20
    .venv/bin/python bench/flower_fixed_cost.py table --label before --label after
    .venv/bin/python bench/flower_fixed_cost.py idle --polls 0.25 1 flower   # CPU of an idle deployment

The experiment is bench/engines.py's: configs/lm.yaml (SmolLM2-135M, LoRA r=8), two clients
(sci.med, rec.sport.hockey), 2 rounds, evaluated every round, on `fedtune deploy` (TLS, SuperNode
auth, one SuperNode per client, one thread each) and on `fedtune run` (in-process).

- `imports`: a cold ClientApp process, split: the interpreter (`python -c pass`), Flower's
  `flwr-clientapp` modules, torch + transformers + peft (what any model-training ClientApp
  imports), then the app module the deployment's FAB names and the set-up of one node
  (`client_runtime`) with its phases (fedtune's lazy imports, tokenizer, data, model, plan), each
  in a fresh process (1 warm-up, then the median of 3). Also which heavy packages the node imported.
- `deploy`: per step count, the in-process run and the deployment run with FEDTUNE_PROFILE set:
  each ClientApp and the server write one line per message (`fedtune.engines.flower.profile`), so
  each message's round trip splits into Flower's part before the ClientApp process exists, the
  process start up to the handler, the set-up, the work, and Flower's part after the reply.
  Rounds' `train_seconds` / `eval_seconds` give the ratio deployment / in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "flower_fixed_cost"
HEAVY = [
    "fedtune.recipes",
    "flwr.serverapp",
    "flwr.server",
    "flwr_datasets",
    "datasets",
    "pandas",
    "pyarrow",
    "matplotlib",
    "seaborn",
    "scipy",
    "networkx",
]


LIGHT = ["train.batch_size=2", "data.block_size=64", "data.max_test_blocks=4"]  # a quarter of the step's work


def overrides(steps: int, rounds: int, light: bool = False) -> list[str]:
    return [
        "model.name=smollm2",
        f"rounds={rounds}",
        "data.labels=[sci.med, rec.sport.hockey]",
        f"train.steps={steps}",
        "evaluation.every=1",
        *(LIGHT if light else []),
    ]


def env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "TQDM_DISABLE": "1"}


# --- imports: one cold ClientApp process, split --------------------------------------------------

NODE = """
import json, sys, time
t0 = time.perf_counter()
import flwr.supernode.cli  # what `flwr-clientapp` imports before it loads an app
t1 = time.perf_counter()
import torch, transformers, peft
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama
t2 = time.perf_counter()
import importlib
importlib.import_module(sys.argv[1])
t3 = time.perf_counter()
from fedtune.engines.flower import client_app, profile
client_app.client_runtime(open(sys.argv[2]).read(), 0, sys.argv[3])
t4 = time.perf_counter()
heavy = [m for m in json.loads(sys.argv[4]) if m in sys.modules]
print(json.dumps({"flower": t1 - t0, "third_party": t2 - t1, "app_import": t3 - t2, "setup": t4 - t3,
                  "phases": profile.SETUP, "heavy": heavy}))
"""


def app_module(work: Path, cfg_yaml_cfg: object) -> str:
    """The module the deployment's FAB names as its ClientApp (written by `write_app`)."""
    from fedtune.engines.flower_deploy import write_app

    text = (write_app(cfg_yaml_cfg, work / "app", 2) / "pyproject.toml").read_text()  # type: ignore[arg-type]
    ref = next(x for x in text.splitlines() if x.startswith("clientapp"))
    return ref.split('"')[1].split(":")[0]


def wall(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def imports(label: str, repeats: int) -> None:
    from fedtune.config import config_to_yaml, load_config

    cfg = load_config(ROOT / "configs" / "lm.yaml", overrides(4, 2))
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"name": "flower-deploy"})})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        module = app_module(work, cfg)
        (work / "cfg.yaml").write_text(config_to_yaml(cfg))
        node = [sys.executable, "-c", NODE, module, str(work / "cfg.yaml"), str(work / "state"), json.dumps(HEAVY)]
        runs = []
        for i in range(repeats + 1):  # the first warms the page cache, the token cache and any node cache
            interp, _ = wall([sys.executable, "-c", "pass"])
            total, out = wall(node)
            if i:
                runs.append({"interpreter": interp, "total": total, **json.loads(out.strip().splitlines()[-1])})
    med = {k: statistics.median(r[k] for r in runs) for k in ("interpreter", "total", "flower", "third_party")}
    med.update({k: statistics.median(r[k] for r in runs) for k in ("app_import", "setup")})
    phases = sorted({p for r in runs for p in r["phases"]})
    med["phases"] = {p: statistics.median(r["phases"].get(p, 0.0) for r in runs) for p in phases}
    result = {"label": label, "app_module": module, "median": med, "heavy": runs[-1]["heavy"], "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{label}-imports.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median"], indent=1), result["heavy"])


# --- deploy: the loopback deployment against in-process ------------------------------------------


def run_cli(args: list[str], extra_env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, env={**env(), **(extra_env or {})}
    )
    if r.returncode != 0:
        raise SystemExit(f"{args[:2]} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return time.perf_counter() - t0


def rounds_of(run_dir: Path) -> list[dict[str, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["client"] is None and r["round"] > 0]


def psutil_offset() -> float:
    """How far psutil's process start times run early on this boot (/proc/stat's btime is whole seconds)."""
    btime = next(int(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) - btime


def messages(profile: Path) -> list[dict[str, float | str]]:
    """One row per (message, client): the server's send and receive times matched with the
    ClientApp line written between them."""
    lines = [json.loads(x) for x in profile.read_text().splitlines()]
    for x in lines:  # lines of the first version took psutil's create_time: whole-second boot time
        if x["side"] == "client" and "clock" not in x:
            x["created"] += psutil_offset()
    servers = [x for x in lines if x["side"] == "server"]
    clients = [x for x in lines if x["side"] == "client"]
    rows = []
    for s in servers:
        for cid in s["clients"]:
            hits = [
                c
                for c in clients
                if c["kind"] == s["kind"] and c["client"] == cid and s["sent"] - 0.05 <= c["created"] <= s["received"]
            ]
            if len(hits) != 1:
                continue
            c = hits[0]
            setup = sum(c["setup"].values())
            rows.append(
                {
                    "kind": s["kind"],
                    "round": s["round"],
                    "client": cid,
                    "round_trip": s["received"] - s["sent"],
                    "flower_before": c["created"] - s["sent"],
                    "start_to_handler": c["handler0"] - c["created"],
                    **{f"setup_{k}": v for k, v in c["setup"].items()},
                    "setup": setup,
                    "work": c["handler1"] - c["handler0"] - setup,
                    "flower_after": s["received"] - c["handler1"],
                }
            )
    return rows


def deploy(
    label: str,
    steps_list: list[int],
    rounds: int,
    light: bool,
    cold: bool = False,
    preload: bool = True,
    flower_polls: bool = False,
) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for steps in steps_list:
        base = OUT / label / f"steps{steps}"
        common = ["configs/lm.yaml", *[x for o in overrides(steps, rounds, light) for x in ("--set", o)]]
        inproc = base / "inprocess"
        wall_in = run_cli(["run", *common, "--set", f"output_dir={inproc}", "--no-progress", "--overwrite"])
        dep, prof = base / "deploy", base / "profile.jsonl"
        prof.unlink(missing_ok=True)
        dep_args = ["deploy", *common, "--set", f"output_dir={dep}", "--work", str(base / "work")]
        dep_args += ["--no-warm"] if cold else []
        dep_args += [] if preload else ["--no-preload"]
        polls = {"FEDTUNE_SUPERNODE_POLL": "flower"} if flower_polls else {}
        wall_dep = run_cli(dep_args, {"FEDTUNE_PROFILE": str(prof), **polls})
        a, b = rounds_of(inproc), rounds_of(dep)
        result = {
            "steps": steps,
            "wall": {"inprocess": wall_in, "deploy": wall_dep},
            "inprocess": {k: statistics.mean(r[k] for r in a) for k in ("train_seconds", "eval_seconds")},
            "deploy": {k: statistics.mean(r[k] for r in b) for k in ("train_seconds", "eval_seconds")},
            "ppl": {"inprocess": a[-1]["mean_ppl"], "deploy": b[-1]["mean_ppl"]},
            "messages": messages(prof),
        }
        (base / "result.json").write_text(json.dumps(result, indent=1))
        print(steps, result["inprocess"], result["deploy"], result["ppl"], flush=True)


# --- idle -------------------------------------------------------------------------------------------


def idle(polls: list[str], nodes: int, seconds: float) -> None:
    """CPU an idle loopback deployment burns (SuperLink, SuperExecs, SuperNodes and their zygotes,
    no run submitted), per process, for each FEDTUNE_SUPERNODE_POLL value in `polls`: the price of
    polling more often. CPU time, so it holds even on a loaded machine."""
    import psutil

    sys.path.insert(0, str(ROOT / "src"))
    from fedtune.engines.flower_deploy import LocalDeployment

    for poll in polls:
        os.environ["FEDTUNE_SUPERNODE_POLL"] = poll
        with tempfile.TemporaryDirectory() as tmp, LocalDeployment(Path(tmp), nodes, port=9692, node_port=9700) as dep:
            dep.start_superlink()
            dep.wait_for_superlink()
            for i in range(nodes):
                dep.start_supernode(i)
            time.sleep(40)  # imports, the zygotes, registration
            procs = [
                q for p in dep.procs.values() for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(True)]
            ]

            def cpu(procs: list[psutil.Process] = procs) -> dict[int, tuple[float, str]]:
                out = {}
                for q in procs:
                    try:
                        c = q.cpu_times()
                        out[q.pid] = (c.user + c.system, " ".join(q.cmdline()[1:3])[-50:])
                    except psutil.Error:
                        pass
                return out

            a, t0 = cpu(), time.perf_counter()
            time.sleep(seconds)
            b, wall = cpu(), time.perf_counter() - t0
        share = {pid: 100 * (b[pid][0] - a[pid][0]) / wall for pid in b if pid in a}
        print(
            f"FEDTUNE_SUPERNODE_POLL={poll}: {sum(share.values()):.1f} % of one core in all ({nodes} idle SuperNodes)"
        )
        for pid, pct in sorted(share.items(), key=lambda x: -x[1]):
            print(f"  {pct:5.1f} %  {b[pid][1]}")


# --- table ------------------------------------------------------------------------------------------


def table(labels: list[str]) -> None:
    parts = ["flower_before", "start_to_handler", "setup", "work", "flower_after", "round_trip"]
    for label in labels:
        f = OUT / f"{label}-imports.json"
        if f.exists():
            m = json.loads(f.read_text())["median"]
            ph = ", ".join(f"{k} {v:.2f}" for k, v in m["phases"].items())
            print(
                f"{label} cold process: interpreter {m['interpreter']:.2f} | flower {m['flower']:.2f} | "
                f"torch+transformers+peft {m['third_party']:.2f} | app import {m['app_import']:.2f} | "
                f"set-up {m['setup']:.2f} ({ph}) | process total {m['total']:.2f}"
            )
        for res in sorted((OUT / label).glob("steps*/result.json"), key=lambda p: int(p.parent.name[5:])):
            r = json.loads(res.read_text())
            r["messages"] = messages(res.parent / "profile.jsonl")  # with today's matching and clock correction
            for kind, key in (("train", "train_seconds"), ("evaluate", "eval_seconds")):
                rows = [x for x in r["messages"] if x["kind"] == kind]
                if not rows:
                    continue
                mean = {p: statistics.mean(float(x[p]) for x in rows) for p in parts}
                fixed = mean["round_trip"] - mean["work"]
                ratio = r["deploy"][key] / r["inprocess"][key]
                print(
                    f"{label} steps {r['steps']:>2} {kind:<8} n={len(rows)} "
                    + " ".join(f"{p} {mean[p]:.2f}" for p in parts)
                    + f" | fixed {fixed:.2f} | deploy {r['deploy'][key]:.2f} s vs in-process "
                    f"{r['inprocess'][key]:.2f} s = {ratio:.2f}x"
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("imports")
    p.add_argument("--label", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("deploy")
    p.add_argument("--label", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--light", action="store_true", help=f"the ratio curve's lighter step: {' '.join(LIGHT)}")
    p.add_argument("--cold", action="store_true", help="`fedtune deploy --no-warm`: Flower's cold ClientApp processes")
    p.add_argument("--no-preload", action="store_true", help="`fedtune deploy --no-preload`: warm, set up per message")
    p.add_argument(
        "--flower-polls",
        action="store_true",
        help="FEDTUNE_SUPERNODE_POLL=flower: Flower's own SuperNode sleeps",
    )
    p = sub.add_parser("idle")
    p.add_argument("--polls", nargs="+", default=["0.25", "flower"])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30.0)
    p = sub.add_parser("table")
    p.add_argument("--label", action="append", required=True)
    a = ap.parse_args()
    if a.cmd == "imports":
        imports(a.label, a.repeats)
    elif a.cmd == "deploy":
        deploy(a.label, a.steps, a.rounds, a.light, a.cold, not a.no_preload, a.flower_polls)
    elif a.cmd == "idle":
        idle(a.polls, a.nodes, a.seconds)
    else:
        table(a.label)


if __name__ == "__main__":
    main()

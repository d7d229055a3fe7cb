"""`engine.name: p2p-local`: a local swarm of `fedtune peer` processes on 127.0.0.1 (for testing
the real transport on one machine), then the peers' own records merged into the run's records in
the in-process decentralized run's format, so `fedtune run`, `report` and the plots work unchanged.

Peer 0 starts first and the others are given its visible multiaddrs (hivemind peers started
together can form separate DHTs). Each peer is its own process group (it has a DHT process and a
p2pd daemon under it); every group is killed when the run ends, however it ends, and every
process ever seen under a peer is recorded in peers/pids.json and killed too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.client.run import ClientState
from fedtune.client.store import ClientStateStore
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.p2p import require_hivemind
from fedtune.errors import FedtuneError
from fedtune.recipes.federated import RunResult
from fedtune.recipes.peer import FACTS, PEERS_DIR, peer_dir
from fedtune.report import io
from fedtune.report.plots import plot_runs
from fedtune.report.records import round_summary
from fedtune.report.summary import summary_json
from fedtune.strategies.decentralized import consensus_distance
from fedtune.topology import SPECTRAL_GAP_MAX_PEERS, coefficient_matrix, mixing_gap

PIDS = "pids.json"


def peer_ids(cfg: ExperimentConfig) -> list[str]:
    """The config's client ids (the partition, without loading a model)."""
    from fedtune.data.partition import partition_ids
    from fedtune.data.sources import load_corpus

    return sorted(partition_ids(load_corpus(cfg.data), cfg.partition, cfg.seed))


def peer_threads(peers: int) -> int:
    """Intra-op threads for each of `peers` processes on this machine: its cores split between
    them (at least 1), so the local swarm does not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, peers))


def start_peer(
    config: Path, peer: str, run_dir: Path, swarm: str, initial_peers: Sequence[str], threads: int | None = None
) -> subprocess.Popen[bytes]:
    """`fedtune peer CONFIG --id PEER` as its own process group, logging to peers/<peer>.log;
    `threads` sets its OMP / MKL thread count unless the environment already does."""
    log = Path(run_dir) / PEERS_DIR / f"{peer}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fedtune.cli", "peer", str(config), "--id", peer, "--run-dir", str(run_dir)]
    cmd += ["--swarm", swarm, "--host", "127.0.0.1", "--port", "0"]
    for m in initial_peers:
        cmd += ["--initial-peers", m]
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(threads))
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def descendants(procs: Sequence[subprocess.Popen[bytes]]) -> set[int]:
    """The pids of the peers and everything under them (DHT processes, p2pd daemons)."""
    import psutil

    out: set[int] = set()
    for p in procs:
        try:
            out |= {p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    return out


def stop(procs: Sequence[subprocess.Popen[bytes]], seen: set[int]) -> None:
    """Kill every peer's process group, then any process seen under a peer that escaped it."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    for pid in sorted(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for_maddrs(run_dir: Path, peer: str, proc: subprocess.Popen[bytes], deadline: float) -> list[str]:
    """The first peer's visible multiaddrs, once it has written them."""
    f = peer_dir(run_dir, peer) / "maddrs.txt"
    while not f.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise FedtuneError(f"peer {peer!r} did not come up: see {Path(run_dir) / PEERS_DIR / f'{peer}.log'}")
        time.sleep(0.1)
    return [m for m in f.read_text().split() if m]


def run_swarm(cfg: ExperimentConfig, *, resume: bool, overwrite: bool, console: Console) -> RunResult:
    """Run `cfg` as a local swarm of peer processes and merge their records into the run's."""
    if resume:
        raise FedtuneError(
            "engine.name p2p-local cannot --resume the whole swarm; a peer restarted with `fedtune peer` "
            "rejoins from its own state instead"
        )
    require_hivemind()  # before any directory or process: the p2p extra is optional
    t_start = time.perf_counter()
    run_dir = io.prepare_run_dir(Path(cfg.run_dir()), resume, overwrite)
    io.write_status(run_dir, "running")
    config = run_dir / io.CONFIG
    io.write_atomic(config, config_to_yaml(cfg))
    ids, swarm = peer_ids(cfg), "fedtune-" + io.run_token(run_dir)
    procs: list[subprocess.Popen[bytes]] = []
    seen: set[int] = set()
    try:
        threads = peer_threads(len(ids))  # the machine's cores split between its peers
        procs.append(start_peer(config, ids[0], run_dir, swarm, [], threads))
        first = wait_for_maddrs(run_dir, ids[0], procs[0], time.monotonic() + cfg.engine.join_timeout)
        procs += [start_peer(config, p, run_dir, swarm, first, threads) for p in ids[1:]]
        t_up = time.perf_counter()
        while any(p.poll() is None for p in procs):
            seen |= descendants(procs)
            time.sleep(0.2)
        bad = [(p, ids[k]) for k, p in enumerate(procs) if p.returncode != 0]
        if bad:
            p, peer = bad[0]
            log = run_dir / PEERS_DIR / f"{peer}.log"
            tail = log.read_text().strip().splitlines()[-5:] if log.exists() else []
            raise FedtuneError(f"peer {peer!r} exited with {p.returncode}; {log}:\n" + "\n".join(tail))
    except BaseException as e:
        io.mark_failed(run_dir, e, new=True)
        raise
    finally:
        stop(procs, seen)
        io.write_atomic(run_dir / PEERS_DIR / PIDS, json.dumps(sorted(seen)))
    records = merge_records(run_dir, ids, cfg.rounds)
    # until every peer process was started (peer 0 up first); each peer's setup_seconds is until all had joined
    next(r for r in records if r["round"] == 0 and r["client"] is None)["swarm_start_seconds"] = t_up - t_start
    io.write_jsonl(run_dir / io.METRICS, records)
    plot_runs({cfg.name: records}, run_dir / "plots")
    io.write_atomic(run_dir / io.SUMMARY, summary_json(cfg, records, time.perf_counter() - t_start))
    final = max(r["round"] for r in records)
    io.write_status(run_dir, "complete", round=final)
    return RunResult(run_dir, records, final)


def merge_records(run_dir: Path, ids: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """The run's records from the peers' own: per round, each peer's client record (a peer that
    was expected to train and never announced it is a recorded failure) and a round summary
    (bytes from the real payloads, failures, ppl; consensus distance of the live peers' stored
    models; the spectral gap of the live peers' rows; the largest mixing error; messages)."""
    lines: dict[str, dict[int, dict[str, Any]]] = {}
    for p in ids:
        f = peer_dir(run_dir, p) / io.METRICS
        lines[p] = {int(r["round"]): r for r in io.read_jsonl(f)} if f.exists() else {}
    facts_file = next((peer_dir(run_dir, p) / FACTS for p in ids if (peer_dir(run_dir, p) / FACTS).exists()), None)
    facts = json.loads(facts_file.read_text()) if facts_file is not None else {}
    out: list[dict[str, Any]] = []
    cum = 0
    for rnd in range(rounds + 1):
        mine = {p: lines[p][rnd] for p in ids if rnd in lines[p]}
        if rnd > 0 and not mine:
            break
        recs = [dict(m["record"]) for m in mine.values() if m["record"] is not None]
        peers = {p: m["peer"] for p, m in mine.items()}
        expected = sorted({t for m in peers.values() for t in m.get("trainers", [])})
        # a trainer failed when a peer other than itself mixed without it: down, or late (a peer that
        # rejoins mid-round trains, finds itself alone and records its own round, kept with the failure)
        failed = [p for p in expected if p not in mine or any(p not in m["live"] for q, m in peers.items() if q != p)]
        live = [p for p in expected if p not in failed]
        for p in failed:
            why = "did not announce a trained model by the round's deadline (peer down or late)"
            old = next((r for r in recs if r["client"] == p), None)
            if old is None:
                recs.append({"round": rnd, "client": p, "sampled": True, "bytes_up": 0, "bytes_down": 0})
            (old or recs[-1])["failure"] = why
        recs.sort(key=lambda r: str(r["client"]))
        evals = {str(r["client"]): r for r in recs}
        up = sum(int(r.get("bytes_up", 0)) for r in recs)
        summary: dict[str, Any] = {"round": rnd, "client": None, **round_summary(evals, up, 0, cum, len(failed))}
        cum += up
        if rnd == 0:
            summary.update(facts)
        else:
            summary.update(round_metrics(run_dir, rnd, peers, live))
            losses = [float(r["train_loss"]) for r in recs if "train_loss" in r]
            if losses:
                summary["train_loss"] = sum(losses) / len(losses)
        out += [*recs, summary]
    return out


def round_metrics(
    run_dir: Path, rnd: int, peers: Mapping[str, Mapping[str, Any]], live: Sequence[str]
) -> dict[str, Any]:
    """A round's swarm-wide numbers from what each peer recorded and stored."""
    out: dict[str, Any] = {
        **next((m["graph"] for m in peers.values() if m.get("graph")), {}),
        "agg_error": max((float(m["agg_error"]) for m in peers.values()), default=0.0),
        "gossip_messages": sum(len(m["received"]) for m in peers.values()),
        "train_seconds": max(float(m["train_seconds"]) for m in peers.values()),
        "exchange_seconds": max(float(m["exchange_seconds"]) for m in peers.values()),
        "wall_seconds": max(float(m["wall_seconds"]) for m in peers.values()),
    }
    fetched = sum(int(m.get("fetched", 0)) for m in peers.values())
    if fetched:  # MoDeST: trainers that started from another peer's model (a message each)
        out["fetch_messages"] = fetched
    mixed = [p for p in live if p in peers and peers[p]["row"]]
    models = []
    for p in mixed:  # each peer's stored model after round rnd (on this machine: the local swarm's disks)
        store = ClientStateStore(peer_dir(run_dir, p) / "clients", ClientState())
        state = store.get(p, before=rnd + 1).peer
        if state is not None:
            models.append(state.model())
    if len(models) == len(mixed):
        out["consensus_distance"] = consensus_distance(models)
    if 0 < len(mixed) <= SPECTRAL_GAP_MAX_PEERS and all(set(peers[p]["row"]) <= set(mixed) for p in mixed):
        out["spectral_gap"] = mixing_gap(coefficient_matrix({p: peers[p]["row"] for p in mixed}, mixed))
    return out

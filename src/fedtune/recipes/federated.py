"""The federated loop, top to bottom: clients + model + strategy + engine (a Federation) ->
rounds of (sample -> configure -> encode -> clients run -> decode + screen -> aggregate ->
evaluate -> append records + checkpoint) -> export + report."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune import components
from fedtune.client.run import ClientJob, ClientReply
from fedtune.codecs.base import Codec
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.capabilities import Engine
from fedtune.engines.federation import Federation, variants_per_client
from fedtune.engines.inprocess import inprocess_federation
from fedtune.engines.plan import privacy_facts
from fedtune.errors import TrainingDivergedError
from fedtune.models.adapters import get_state, trainable_keys
from fedtune.models.export import export_adapters
from fedtune.privacy.accounting import sample_epsilons
from fedtune.privacy.randomness import describe
from fedtune.recipes.ledger import Ledger, trained_replies, update_ledger
from fedtune.recipes.loops import own_loop, task_loop
from fedtune.report import io
from fedtune.report.plots import plot_runs
from fedtune.report.records import client_records, eval_records, round_summary
from fedtune.report.summary import progress_bars, round_line, setup_lines, summary_json
from fedtune.report.trackers import Tracker, open_trackers
from fedtune.sampling import evaluation_clients, sample_round
from fedtune.secagg import SECURE_SUM, secure_sum
from fedtune.seeding import torch_generator
from fedtune.strategies.base import Aggregate, Strategy, client_transform_of, server_strategy
from fedtune.types import AdapterState, ClientFailure, ClientUpdate
from fedtune.validation import screen

AfterRound = Callable[[int], None]


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]]
    final_round: int


def run_federated(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    after_round: AfterRound | None = None,
    console: Console | None = None,
    federation: Callable[[ExperimentConfig], Federation] | None = None,
) -> RunResult:
    """Run (or resume) `cfg`; the run directory is `running`, then `complete` or `failed` (with
    error.log). A config or data error before round 1 of a new run leaves no directory behind."""
    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    run_dir = io.prepare_run_dir(Path(cfg.run_dir()), resume, overwrite)
    io.write_status(run_dir, "running")
    r = cfg.report
    trackers = open_trackers(r.trackers, run_dir, cfg.model_dump(), r.mlflow_uri, r.mlflow_experiment, cfg.name)
    try:
        loop = task_loop(cfg) or _run  # `task: embedding` has its own loop (recipes/embedding.py)
        result = loop(cfg, run_dir, t_start, resume, progress, after_round, console, federation, trackers)
    except BaseException as e:
        for t in trackers:
            t.finish(run_dir / "plots", "failed")
        io.mark_failed(run_dir, e, new=not resume)
        raise
    io.write_status(run_dir, "complete", round=result.final_round)
    for t in trackers:
        t.finish(run_dir / "plots", "complete")
    return result


def _run(
    cfg: ExperimentConfig,
    run_dir: Path,
    t_start: float,
    resume: bool,
    progress: bool,
    after_round: AfterRound | None,
    console: Console,
    federation: Callable[[ExperimentConfig], Federation] | None,
    trackers: Sequence[Tracker] = (),
) -> RunResult:
    # 1. clients, data, model, strategy, engine (data fails before any weights load)
    fed = (federation or inprocess_federation)(cfg)
    loop = own_loop(fed.strategy.capabilities)  # no server (peers), or each party's own model (distill)
    if loop is not None:
        return loop(cfg, fed, run_dir, t_start, resume, progress, after_round, console, trackers)
    strategy = server_strategy(fed.strategy, cfg.strategy.name)
    engine, caps, ids = fed.engine, strategy.capabilities, fed.client_ids
    chat = "data_chat_template" in fed.round0  # instruction data (DP-SGD's unit is one example)
    up_codec, down_codec = components.build_codec(cfg), components.build_codec(cfg, downlink=True)
    metrics_path, token = run_dir / io.METRICS, io.run_token(run_dir)
    for line in (
        []
        if resume
        else setup_lines({**fed.round0, **fed.source_facts}, cfg.data.max_chars_per_doc, cfg.data.max_docs_per_label)
    ):
        console.print(line, highlight=False)

    # 2. start or resume
    if resume:
        ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
        start, global_state, sstate = ckpt["round"] + 1, ckpt["global"], ckpt["strategy_state"]
        codec_states, ledger = ckpt["codec_states"], Ledger(**ckpt["ledger"])
        kept = [r for r in io.read_jsonl(metrics_path) if r["round"] <= ckpt["round"]]
        io.write_jsonl(metrics_path, kept)  # drop records of a round that was never checkpointed
        console.print(f"resuming {run_dir} after round {ckpt['round']}")
        ledger.resume_setup += time.perf_counter() - t_start  # this process's set-up (summary.json's split)
    else:
        io.write_atomic(run_dir / io.CONFIG, config_to_yaml(cfg))
        global_state = get_state(fed.model)
        sstate, codec_states, ledger, start = strategy.init_state(global_state), {}, Ledger(), 1
        watched = evaluation_clients(ids, cfg.evaluation.clients, cfg.seed)
        base = eval_records(0, caps, engine, watched, global_state, None, cfg.evaluation.ood, cfg.evaluation.val)
        summary = {"round": 0, "client": None, **round_summary(base, 0, 0, 0, 0), **fed.round0}
        summary.update(privacy_facts(cfg, caps), setup_seconds=time.perf_counter() - t_start)
        log_round(metrics_path, trackers, 0, client_records(0, ids, [], base, [], [], True), summary)

    # 3. rounds
    bars = progress_bars(console, progress)
    with bars:
        round_task = bars.add_task("rounds", total=cfg.rounds, completed=start - 1)
        step_task = bars.add_task("client", total=1)

        def on_step(cid: str, step: int, total: int, loss: float) -> None:
            bars.update(step_task, description=f"client {cid} loss {loss:.3f}", completed=step, total=total)

        for rnd in range(start if ledger.stopped is None else cfg.rounds + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            sampled = sample_round(ids, cfg.sampling, cfg.seed, rnd, cfg.randomness())
            trainers = ["pooled"] if caps.pools_data else sampled

            # server -> clients -> server
            sent = strategy.configure(rnd, trainers, sstate)
            jobs = make_jobs(rnd, trainers, sent, down_codec, codec_states, cfg, strategy, sstate, token)
            replies = run_jobs(engine, jobs, on_step, rnd, run_dir)
            t_train = time.perf_counter()
            sent_updates, failures, presummed = receive(replies, jobs, up_codec, codec_states, sent, cfg, caps)
            updates = sent_updates
            if cfg.secure_aggregation and updates:  # the strategy sees only the unmasked sum
                updates = [presummed or secure_sum(updates, caps.sum_weight)]

            # aggregate (too few replies: keep the global model; the failures are recorded). A strategy
            # that accounts for Poisson sampling aggregates every round, an empty one too (noise alone):
            # whether a round is skipped would depend on who is in the data
            released = caps.accounts_sampling and cfg.sampling.scheme == "poisson"
            skipped = not released and (len(sent_updates) < cfg.sampling.min_updates or not updates)
            agg = Aggregate(global_state, sstate) if skipped else strategy.aggregate(rnd, updates, sstate, engine.peers)
            global_state, sstate = agg.global_state, agg.state
            t_agg = time.perf_counter()

            # bytes (every number is the length of a real payload), stop conditions
            up, down = round_bytes(caps.transmits, sent_updates, failures, jobs, agg, fed.collected_bytes * (rnd == 1))
            trained = trained_replies(replies)
            eps = sample_epsilons(ledger.dp_steps, trained, cfg.train.dp_sgd) if cfg.train.dp_sgd else {}
            stop = agg.stop or budget_stop(cfg, ledger.cum_bytes + up + down) or dp_sgd_stop(cfg, eps)

            # evaluate, log, checkpoint
            last = rnd == cfg.rounds or stop is not None
            evals: dict[str, dict[str, float]] = {}
            if last or rnd % cfg.evaluation.every == 0:
                ev = cfg.evaluation  # a fixed seeded sample of clients (all by default) plus this round's trainers
                scored = sorted(set(evaluation_clients(ids, ev.clients, cfg.seed)) | set(sampled))
                personal = strategy.configure(rnd + 1, scored, sstate) if caps.personalized else None
                evals = eval_records(rnd, caps, engine, scored, global_state, personal, ev.ood, ev.val)
            t_eval = time.perf_counter()
            extra = {c: {"sample_epsilon": e} for c, (e, _) in eps.items()}
            for c, more in agg.per_client.items():  # e.g. a peer's gossip messages sent and received
                extra[c] = {**extra.get(c, {}), **more}
            recs = client_records(rnd, ids, trainers, evals, sent_updates, failures, caps.transmits, extra)
            summary = round_summary(evals, up, down, ledger.cum_bytes, len(failures))
            summary.update(agg.metrics)
            summary.update(train_seconds=t_train - t0, aggregate_seconds=t_agg - t_train, eval_seconds=t_eval - t_agg)
            ledger = update_ledger(ledger, summary, trained, eps, stop)
            summary.update(round_extras(cfg, sent_updates, failures, skipped, ledger, chat))
            summary["wall_seconds"] = time.perf_counter() - t0
            t_io = time.perf_counter()
            log_round(metrics_path, trackers, rnd, recs, summary)
            state = {"round": rnd, "global": global_state, "strategy_state": sstate, "codec_states": codec_states}
            io.save_checkpoint(run_dir / io.CHECKPOINT, {**state, "ledger": ledger.saved(t_start)})
            ledger.io_seconds += time.perf_counter() - t_io
            bars.update(round_task, completed=rnd)
            if progress and not console.is_terminal:  # batch jobs: one line a round
                console.print(round_line(rnd, cfg.rounds, summary), highlight=False)
            if after_round is not None:
                after_round(rnd)
            if stop is not None:
                console.print(f"[yellow]stopping after round {rnd}: {stop}[/yellow]")
                break

    # 4. export + report
    records = io.read_jsonl(metrics_path)
    personal = strategy.configure(cfg.rounds + 1, ids, sstate) if caps.personalized else None
    variants = variants_per_client(cfg, ids)
    glob = global_state if caps.has_global else None
    on_clients = export_adapters(run_dir, fed, glob, personal, engine.private_of, variants, caps.client_private)
    if on_clients:
        console.print(f"personal adapters of {', '.join(on_clients)} stay on their clients (their private tensors)")
    plot_runs({cfg.name: records}, run_dir / "plots")
    io.write_atomic(run_dir / io.SUMMARY, summary_json(cfg, records, ledger.wall(t_start), ledger))
    return RunResult(run_dir, records, max(r["round"] for r in records))


def run_jobs(
    engine: Engine, jobs: list[ClientJob], on_step: Any, rnd: int, run_dir: Path
) -> list[ClientReply | ClientFailure]:
    """The engine's replies to this round's jobs; a diverged client names the checkpoint to resume."""
    try:
        return list(engine.run(jobs, on_step))
    except TrainingDivergedError as e:
        if rnd == 1:  # nothing was trained: a new run leaves no directory (report.io.mark_failed)
            raise TrainingDivergedError(f"round 1: {e}; nothing was trained, so nothing is kept") from None
        raise TrainingDivergedError(
            f"round {rnd}: {e}. Rounds 1-{rnd - 1} are kept in {run_dir} (a resume continues the same "
            "experiment, so it cannot change train.lr: start a new run with --set train.lr=... --set name=OTHER)"
        ) from None


def round_bytes(
    transmits: bool,
    updates: list[ClientUpdate],
    failures: list[ClientFailure],
    jobs: list[ClientJob],
    agg: Aggregate,
    collected: int,
) -> tuple[int, int]:
    """(bytes up, bytes down) of a round, every number the length of a real payload: uploads
    (failed ones too), downloads, the strategy's extra exchanges and raw data it collected
    (local / centralized: no model crosses the network)."""
    wire = int(transmits)
    up = wire * (sum(u.bytes_up for u in updates) + sum(f.bytes_up for f in failures)) + agg.bytes_up + collected
    return up, wire * sum(len(j.payload) for j in jobs) + agg.bytes_down


def log_round(
    path: Path, trackers: Sequence[Tracker], rnd: int, recs: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """Append the round's client records and summary (flushed, fsynced), then tell the trackers."""
    io.append_jsonl(path, [*recs, {"round": rnd, "client": None, **summary}])
    for t in trackers:
        t.log(rnd, summary, recs)


def make_jobs(
    rnd: int,
    trainers: list[str],
    sent: Mapping[str, AdapterState],
    down_codec: Codec,
    codec_states: dict[str, Any],
    cfg: ExperimentConfig,
    strategy: Strategy,
    sstate: Any,
    token: str,
) -> list[ClientJob]:
    """Encode each trainer's downlink payload (one encoder state per receiver)."""
    client_transform = client_transform_of(strategy)
    transform = client_transform.client_transform_config(sstate) if client_transform is not None else {}
    jobs = []
    for cid in trainers:
        payload, codec_states["down:" + cid] = down_codec.encode(
            sent[cid], codec_states.get("down:" + cid), torch_generator(cfg.seed, "codec-down", rnd, cid)
        )
        jobs.append(ClientJob(rnd, cid, payload, tuple(trainers), transform, token))
    return jobs


def receive(
    replies: list[ClientReply | ClientFailure],
    jobs: list[ClientJob],
    up_codec: Codec,
    codec_states: dict[str, Any],
    sent: Mapping[str, AdapterState],
    cfg: ExperimentConfig,
    caps: Any,
) -> tuple[list[ClientUpdate], list[ClientFailure], ClientUpdate | None]:
    """Decode uplinks (a decoder state per sender), screen them: NaN/Inf, bad keys/shapes/dtypes/sizes fail."""
    updates, failures, presummed = [], [], None
    own = {cid: components.build_codec(cfg, client=cid) for cid in cfg.client_codecs}  # per-client uplinks
    for r in replies:
        if isinstance(r, ClientFailure):
            failures.append(r)
        elif r.client_id == SECURE_SUM:  # Flower's SecAgg+ unmasked the sum itself
            delta, _ = up_codec.decode(r.payload, None)
            presummed = ClientUpdate(SECURE_SUM, delta, r.num_examples, dict(r.metrics), 0, 0)
        elif presummed is None and not r.payload:  # a SecAgg+ participant: metrics only
            updates.append(ClientUpdate(r.client_id, {}, r.num_examples, dict(r.metrics), r.bytes_up, r.bytes_down))
        else:
            delta, codec_states["dec:" + r.client_id] = own.get(r.client_id, up_codec).decode(
                r.payload, codec_states.get("dec:" + r.client_id)
            )
            updates.append(ClientUpdate(r.client_id, delta, r.num_examples, r.metrics, r.bytes_up, r.bytes_down))
    secagg_plus = any(not u.delta for u in updates) or presummed is not None
    expected = None if caps.client_step or secagg_plus else _expected_delta
    max_up = int(cfg.sampling.max_update_mb * 1e6) if cfg.sampling.max_update_mb else None
    masked = cfg.secure_aggregation and not secagg_plus
    ok, rejected = screen(updates, sent, expected, max_up, masked=masked)
    if masked and rejected and ok:  # the rejected uploads' masks would not cancel: abort, never sum wrong
        why = f"secure aggregation round aborted: the masked upload of {rejected[0].client_id} was rejected"
        failures += [ClientFailure(u.client_id, why, u.bytes_down, u.bytes_up) for u in ok]
        ok = []
    return ok, failures + rejected, presummed


def budget_stop(cfg: ExperimentConfig, spent: int) -> str | None:
    if cfg.budget_mb is not None and spent >= cfg.budget_mb * 1e6:
        return f"budget_mb = {cfg.budget_mb:g} reached ({spent / 1e6:.3f} MB)"
    return None


def dp_sgd_stop(cfg: ExperimentConfig, eps: dict[str, tuple[float, float]]) -> str | None:
    dp = cfg.train.dp_sgd
    if dp is None or dp.target_epsilon is None:
        return None
    over = sorted(c for c, (_, nxt) in eps.items() if nxt > dp.target_epsilon)
    if not over:
        return None
    return (
        f"train.dp_sgd.target_epsilon = {dp.target_epsilon:g}: another round would give client {over[0]} "
        "a sample-level epsilon above it"
    )


def round_extras(
    cfg: ExperimentConfig,
    updates: list[ClientUpdate],
    failures: list[ClientFailure],
    skipped: bool,
    ledger: Ledger,
    chat: bool = False,
) -> dict[str, Any]:
    """Round-record fields beyond bytes and ppl: stop, skip, train loss, simulated time, DP-SGD
    (`chat`: instruction data, where each training row is one whole example)."""
    out: dict[str, Any] = {}
    if ledger.stopped is not None:
        out["stopped"] = ledger.stopped
    if skipped:
        out["skipped"] = f"{len(updates)} updates < sampling.min_updates = {cfg.sampling.min_updates}"
    if updates and all("train_loss" in u.metrics for u in updates):  # withheld under DP / secure aggregation
        out["train_loss"] = sum(u.metrics["train_loss"] for u in updates) / len(updates)
    for key in sorted({k for u in updates for k in u.metrics if k.startswith("adapter_")}):  # Adapter.state_metrics
        values = [u.metrics[key] for u in updates if key in u.metrics]
        out[key] = sum(values) / len(values)
    if any("sim_time" in u.metrics for u in updates):  # until the slowest reply, or the deadline if missed
        missed = any(f.reason.startswith("missed the deadline") for f in failures)
        slowest = max(u.metrics["sim_time"] for u in updates)
        out["sim_round_time"] = float(cfg.sampling.deadline) if missed and cfg.sampling.deadline else slowest
    if any("codec_skipped" in u.metrics for u in updates):  # lazy uploads (AQUILA)
        out["uploads_skipped"] = int(sum(u.metrics.get("codec_skipped", 0) for u in updates))
    if cfg.train.dp_sgd is not None:  # the worst client's epsilon so far (each only grows)
        dp = cfg.train.dp_sgd
        out.update(
            sample_epsilon=ledger.sample_epsilon,
            sample_dp_delta=dp.delta,
            sample_dp_accounting="RDP, Poisson-subsampled Gaussian per local step, composed over each "
            f"client's steps, sigma={dp.noise_multiplier:g}",
            sample_dp_unit=(
                f"example: one instruction / chat example (a row of <= {cfg.data.block_size} tokens)"
                if chat
                else "document: every block of a document is sampled and clipped together"
                if dp.unit == "document"
                else f"block: one packed {cfg.data.block_size}-token block of the concatenated stream (no "
                "document-level bound: adding or removing a document shifts every later block; use unit: "
                "document)"
            ),
            sample_dp_randomness=describe(cfg.randomness()),
        )
    return out


def _expected_delta(sent: AdapterState) -> dict[str, Any]:
    """An adapter delta has exactly the trainable keys a client received, at their shapes."""
    return {k: sent[k].shape for k in trainable_keys(sent)}

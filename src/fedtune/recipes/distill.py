"""The trust-distillation loop, top to bottom (strategies declaring `own_models`; `run_federated`
hands them here). Each party keeps its own model where it lives (`engines/parties.py`: in this
process, or on its own SuperNode on Flower); only predictions travel:

    public  = `strategy.public_blocks` blocks of a built-in public corpus (never client data)
    for rnd in start..rounds:
        preds   = each party's top-k next-token probabilities on `public`   uplink: encoded payloads
        W       = trust_matrix(preds)          row i: party i's trust in every party (the paper's rule)
        labels  = mix(W[i], preds)             party i's pseudo-label     downlink: encoded payloads
        train   = each party: own data loss + weight * KL(label || model) on public blocks
                  (warm-up rounds: own data only, nothing travels)
        evaluate each party's own model on its own splits -> records (trust row, trust received,
        bytes, failures) + a round summary (trust matrix, consensus gap) -> checkpoint (every
        party's adapter in-process; on Flower each party keeps a version per round on its own disk)
    export nothing shared (there is no common model) -> loss / bytes / trust plots -> summary.json

Predictions of round rnd are computed from the models after round rnd - 1, which the checkpoint
(or the party's own version store) holds, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.federation import Federation
from fedtune.models.load import load_tokenizer
from fedtune.recipes.federated import AfterRound, RunResult, log_round
from fedtune.recipes.ledger import Ledger
from fedtune.report import io
from fedtune.report.plots import plot_runs
from fedtune.report.records import round_summary
from fedtune.report.summary import round_line, summary_json
from fedtune.report.trackers import Tracker
from fedtune.report.trust import plot_trust
from fedtune.strategies.trust_distill import (
    TrustDistill,
    consensus_gap,
    decode_predictions,
    encode_predictions,
    mix,
    trust_matrix,
)


def exchange(
    up: Mapping[str, bytes], k: int, vocab: int, values: Literal["fp16", "uint8"]
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One round's exchange on the server: the parties' prediction payloads in, the trust matrix,
    each party's pseudo-label payload out, and the round's trust metrics."""
    ids = sorted(up)
    got = [decode_predictions(up[c]) for c in ids]
    w = trust_matrix(got)
    down = {c: encode_predictions(mix(w[i].tolist(), got, k, vocab), values) for i, c in enumerate(ids)}
    n = len(ids)
    received = {c: float(sum(w[i, j] for i in range(n) if i != j) / max(1, n - 1)) for j, c in enumerate(ids)}
    metrics = {
        "trust": [[round(float(x), 6) for x in row] for row in w],
        "trust_clients": ids,
        "trust_received": received,
        "consensus_gap": consensus_gap([decode_predictions(down[c]) for c in ids]),
    }
    return down, metrics


def run_distill(
    cfg: ExperimentConfig,
    fed: Federation,
    run_dir: Path,
    t_start: float,
    resume: bool,
    progress: bool,
    after_round: AfterRound | None,
    console: Console,
    trackers: Sequence[Tracker] = (),
) -> RunResult:
    # 1. the parties (their own models and data: in this process, or on their own machines)
    strategy, ids = fed.strategy, fed.client_ids
    if not isinstance(strategy, TrustDistill):  # the recipe of capabilities.own_models: trust_distill's alone
        raise TypeError(f"run_distill runs trust_distill, not {type(strategy).__name__}")
    tokenizer = load_tokenizer(fed.model_dir)
    vocab = int(fed.model.config.vocab_size)
    parties = fed.engine.parties(cfg, strategy, fed.model_dir, tokenizer)
    metrics_path = run_dir / io.METRICS

    # 2. start or resume (the checkpoint holds every party's adapter)
    if resume:
        ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
        start, ledger = ckpt["round"] + 1, Ledger(**ckpt["ledger"])
        parties.restore_(ckpt["parties"])
        kept = [r for r in io.read_jsonl(metrics_path) if r["round"] <= ckpt["round"]]
        io.write_jsonl(metrics_path, kept)  # drop records of a round that was never checkpointed
        console.print(f"resuming {run_dir} after round {ckpt['round']}")
        ledger.resume_setup += time.perf_counter() - t_start  # this process's set-up (summary.json's split)
    else:
        io.write_atomic(run_dir / io.CONFIG, config_to_yaml(cfg))
        ledger, start = Ledger(), 1
        base = parties.evaluate(0)
        specs = {c: strategy.party(n).__dict__ for n, c in enumerate(ids)}
        recs = [{"round": 0, "client": c, **base.get(c, {}), "party": specs[c]} for c in ids]
        summary = {**round_summary(base, 0, 0, 0, 0), **fed.round0, "public_source": strategy.public}
        summary.update(public_positions=parties.public_positions)
        summary["setup_seconds"] = time.perf_counter() - t_start
        log_round(metrics_path, trackers, 0, recs, summary)

    # 3. rounds
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        down: dict[str, bytes] = {}
        sizes: dict[str, dict[str, int]] = {c: {} for c in ids}
        failures: dict[str, str] = {}
        metrics: dict[str, Any] = {}
        if rnd > strategy.warmup_rounds:
            up = {}
            for c, got in parties.predict(rnd).items():
                if isinstance(got, str):
                    failures[c] = got
                else:
                    up[c], sizes[c]["bytes_up"] = got, len(got)
            if len(up) >= 2:  # a consensus needs two parties
                down, metrics = exchange(up, strategy.top_k, vocab, strategy.values)
                for c, payload in down.items():
                    sizes[c]["bytes_down"] = len(payload)
        t_agg = time.perf_counter()
        losses: dict[str, dict[str, float]] = {}
        for c, trained in parties.train(rnd, down).items():
            if isinstance(trained, str):
                failures.setdefault(c, trained)
            else:
                losses[c] = trained
        t_train = time.perf_counter()
        last = rnd == cfg.rounds
        evals = parties.evaluate(rnd) if last or rnd % cfg.evaluation.every == 0 else {}
        t_eval = time.perf_counter()
        n_up = sum(s.get("bytes_up", 0) for s in sizes.values())
        n_down = sum(s.get("bytes_down", 0) for s in sizes.values())
        recs = []
        for c in ids:
            rec: dict[str, Any] = {"round": rnd, "client": c, **evals.get(c, {}), **losses.get(c, {}), **sizes[c]}
            if c in failures:
                rec["failure"] = failures[c]
            if c in down:
                rec["trust"] = dict(zip(metrics["trust_clients"], metrics["trust"][metrics["trust_clients"].index(c)]))
                rec["trust_received"] = metrics["trust_received"][c]
            recs.append(rec)
        summary = round_summary(evals, n_up, n_down, ledger.cum_bytes, len(failures))
        summary.update(metrics)
        summary.update(aggregate_seconds=t_agg - t0, train_seconds=t_train - t_agg, eval_seconds=t_eval - t_train)
        ledger.cum_bytes += n_up + n_down
        summary["wall_seconds"] = time.perf_counter() - t0
        t_io = time.perf_counter()
        log_round(metrics_path, trackers, rnd, recs, summary)
        ckpt = {"round": rnd, "parties": parties.saved(), "ledger": ledger.saved(t_start)}
        io.save_checkpoint(run_dir / io.CHECKPOINT, ckpt)
        ledger.io_seconds += time.perf_counter() - t_io
        if progress and not console.is_terminal:
            console.print(round_line(rnd, cfg.rounds, summary), highlight=False)
        if after_round is not None:
            after_round(rnd)

    # 4. report (each party's adapter is in the checkpoint; there is no shared model to export)
    records = io.read_jsonl(metrics_path)
    plot_runs({cfg.name: records}, run_dir / "plots")
    plot_trust(records, run_dir / "plots")
    io.write_atomic(run_dir / io.SUMMARY, summary_json(cfg, records, ledger.wall(t_start), ledger))
    return RunResult(run_dir, records, max(r["round"] for r in records))

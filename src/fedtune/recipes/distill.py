"""The trust-distillation loop, top to bottom (strategies declaring `own_models`; `run_federated`
hands them here). Each party keeps its own model (`engines/parties.py`); only predictions travel:

    public  = `strategy.public_blocks` blocks of a built-in public corpus (never client data)
    for rnd in start..rounds:
        preds   = each party's top-k next-token probabilities on `public`   uplink: encoded payloads
        W       = trust_matrix(preds)          row i: party i's trust in every party (the paper's rule)
        labels  = mix(W[i], preds)             party i's pseudo-label     downlink: encoded payloads
        train   = each party: own data loss + weight * KL(label || model) on public blocks
                  (warm-up rounds: own data only, nothing travels)
        evaluate each party's own model on its own splits -> records (trust row, trust received,
        bytes) + a round summary (trust matrix, consensus gap) -> checkpoint (every party's adapter)
    export nothing shared (there is no common model) -> loss / bytes / trust plots -> summary.json

Predictions of round rnd are computed from the models after round rnd - 1, which the checkpoint
holds, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from fedtune import components
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.data.blocks import Shard
from fedtune.engines.federation import Federation
from fedtune.engines.parties import build_party_model, party_generator, predict, public_corpus, train_party_
from fedtune.errors import FedtuneError
from fedtune.evaluation.metrics import evaluate_blocks
from fedtune.models.adapters import get_state, set_state_
from fedtune.models.load import load_tokenizer
from fedtune.recipes.federated import AfterRound, Ledger, RunResult, log_round
from fedtune.report import io
from fedtune.report.plots import plot_runs
from fedtune.report.records import round_summary
from fedtune.report.summary import round_line, summary_json
from fedtune.report.trackers import Tracker
from fedtune.report.trust import plot_trust
from fedtune.strategies.trust_distill import (
    Predictions,
    consensus_gap,
    decode_predictions,
    encode_predictions,
    mix,
    trust_matrix,
)


def evaluate_party(model: Any, shard: Shard, batch_size: int, bf16: bool, val: bool) -> dict[str, float]:
    """A party's own model on its own test (and validation) split."""
    out: dict[str, float] = {}
    for split in ("test", "val") if val else ("test",):
        blocks = getattr(shard, split)
        if blocks.shape[0] == 0:
            continue
        r = evaluate_blocks(model, blocks, batch_size, bf16, shard.mask(split))
        out.update({f"{split}_loss": r["loss"], f"{split}_ppl": r["ppl"], f"{split}_tokens": r["tokens"]})
    return out


def exchange(
    preds: Mapping[str, Predictions], k: int, vocab: int, values: Literal["fp16", "uint8"]
) -> tuple[dict[str, Predictions], dict[str, dict[str, int]], dict[str, Any]]:
    """One round's exchange through the server: every party's predictions up (encoded, decoded),
    the trust matrix, each party's pseudo-label down. Returns the labels as each party decodes
    them, bytes per party (lengths of the real payloads) and the round's trust metrics."""
    ids = sorted(preds)
    up = {c: encode_predictions(preds[c], values) for c in ids}
    got = [decode_predictions(up[c]) for c in ids]
    w = trust_matrix(got)
    down = {c: encode_predictions(mix(w[i].tolist(), got, k, vocab), values) for i, c in enumerate(ids)}
    labels = {c: decode_predictions(down[c]) for c in ids}
    sizes = {c: {"bytes_up": len(up[c]), "bytes_down": len(down[c])} for c in ids}
    n = len(ids)
    received = {c: float(sum(w[i, j] for i in range(n) if i != j) / max(1, n - 1)) for j, c in enumerate(ids)}
    metrics = {
        "trust": [[round(float(x), 6) for x in row] for row in w],
        "trust_clients": ids,
        "trust_received": received,
        "consensus_gap": consensus_gap([labels[c] for c in ids]),
    }
    return labels, sizes, metrics


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
    # 1. the parties' own models, their data, the public corpus
    strategy, ids = fed.strategy, fed.client_ids
    shards = getattr(fed.engine, "shards", None)
    if shards is None:
        raise FedtuneError(f"strategy {cfg.strategy.name!r} needs the in-process engine's shards")
    tokenizer = load_tokenizer(fed.model_dir)
    vocab = int(fed.model.config.vocab_size)
    public = public_corpus(cfg, tokenizer, strategy.public, strategy.public_blocks, strategy.public_labels)
    models = {c: build_party_model(cfg, fed.model_dir, strategy.party(n), c) for n, c in enumerate(ids)}
    spec, ev = components.build_train_spec(cfg), cfg.evaluation
    metrics_path = run_dir / io.METRICS

    ood = fed.engine.ood_split() if ev.ood else None  # every party's test data, the same share of each

    def evaluate_all() -> dict[str, dict[str, float]]:
        out = {c: evaluate_party(models[c], shards[c], ev.batch_size, spec.bf16, ev.val) for c in ids}
        if ood is not None:  # each party's own model on the mixture (evaluation.ood)
            for c in ids:
                r = evaluate_blocks(models[c], ood[0], ev.batch_size, spec.bf16, ood[1])
                out[c].update(ood_loss=r["loss"], ood_ppl=r["ppl"], ood_tokens=r["tokens"])
        return out

    # 2. start or resume (the checkpoint holds every party's adapter)
    if resume:
        ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
        start, ledger = ckpt["round"] + 1, Ledger(**ckpt["ledger"])
        for c in ids:
            set_state_(models[c], ckpt["parties"][c])
        kept = [r for r in io.read_jsonl(metrics_path) if r["round"] <= ckpt["round"]]
        io.write_jsonl(metrics_path, kept)  # drop records of a round that was never checkpointed
        console.print(f"resuming {run_dir} after round {ckpt['round']}")
    else:
        io.write_atomic(run_dir / io.CONFIG, config_to_yaml(cfg))
        ledger, start = Ledger(), 1
        base = evaluate_all()
        parties = {c: strategy.party(n).__dict__ for n, c in enumerate(ids)}
        recs = [{"round": 0, "client": c, **base[c], "party": parties[c]} for c in ids]
        summary = {**round_summary(base, 0, 0, 0, 0), **fed.round0, "public_source": strategy.public}
        summary.update(public_positions=int(public.numel()), setup_seconds=time.perf_counter() - t_start)
        log_round(metrics_path, trackers, 0, recs, summary)

    # 3. rounds
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        labels: dict[str, Predictions] = {}
        sizes: dict[str, dict[str, int]] = {}
        metrics: dict[str, Any] = {}
        if rnd > strategy.warmup_rounds:
            preds = {c: predict(models[c], public, strategy.top_k, ev.batch_size, spec.bf16) for c in ids}
            labels, sizes, metrics = exchange(preds, strategy.top_k, vocab, strategy.values)
        t_agg = time.perf_counter()
        losses = {
            c: train_party_(
                models[c], shards[c], public, labels.get(c), spec, strategy.weight, party_generator(cfg.seed, rnd, c)
            )
            for c in ids
        }
        t_train = time.perf_counter()
        last = rnd == cfg.rounds
        evals = evaluate_all() if last or rnd % ev.every == 0 else {}
        t_eval = time.perf_counter()
        up = sum(s["bytes_up"] for s in sizes.values())
        down = sum(s["bytes_down"] for s in sizes.values())
        recs = []
        for i, c in enumerate(ids):
            rec: dict[str, Any] = {"round": rnd, "client": c, **evals.get(c, {}), **losses[c], **sizes.get(c, {})}
            if metrics:
                rec["trust"] = dict(zip(ids, metrics["trust"][i]))
                rec["trust_received"] = metrics["trust_received"][c]
            recs.append(rec)
        summary = round_summary(evals, up, down, ledger.cum_bytes, 0)
        summary.update(metrics)
        summary.update(aggregate_seconds=t_agg - t0, train_seconds=t_train - t_agg, eval_seconds=t_eval - t_train)
        ledger.cum_bytes += up + down
        summary["wall_seconds"] = time.perf_counter() - t0
        t_io = time.perf_counter()
        log_round(metrics_path, trackers, rnd, recs, summary)
        states = {c: get_state(models[c]) for c in ids}
        io.save_checkpoint(run_dir / io.CHECKPOINT, {"round": rnd, "parties": states, "ledger": ledger.__dict__})
        ledger.io_seconds += time.perf_counter() - t_io
        if progress and not console.is_terminal:
            console.print(round_line(rnd, cfg.rounds, summary), highlight=False)
        if after_round is not None:
            after_round(rnd)

    # 4. report (each party's adapter is in the checkpoint; there is no shared model to export)
    records = io.read_jsonl(metrics_path)
    plot_runs({cfg.name: records}, run_dir / "plots")
    plot_trust(records, run_dir / "plots")
    io.write_atomic(run_dir / io.SUMMARY, summary_json(cfg, records, time.perf_counter() - t_start, ledger.io_seconds))
    return RunResult(run_dir, records, max(r["round"] for r in records))

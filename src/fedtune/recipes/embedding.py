"""The federated loop of `task: embedding` (GEM, arXiv:2506.04344), top to bottom: parties +
model (adapter + GEM tokens) + strategy -> rounds of (sample -> configure -> each party's GEM
step -> aggregate -> retrieval per party and pooled -> append records + checkpoint) -> export
(a PEFT adapter plus gem_tokens.safetensors, loadable with plain transformers + PEFT)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from fedtune import components
from fedtune.codecs import serialize
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.embedding.evaluate import evaluate_states
from fedtune.embedding.export import GEM_CONFIG_FILE, GEM_TOKENS_FILE
from fedtune.embedding.gem import GEM_KEY, init_tokens
from fedtune.embedding.parties import build_parties
from fedtune.embedding.train import gem_state, local_gem_train_
from fedtune.engines.federation import build_adapted_model, run_precision
from fedtune.errors import FedtuneError
from fedtune.files import write_atomic
from fedtune.models.adapters import lora_scale
from fedtune.models.export import adapter_folder
from fedtune.models.load import load_tokenizer, resolve_model_dir
from fedtune.report import io
from fedtune.report.trackers import Tracker
from fedtune.sampling import sample_round
from fedtune.seeding import torch_generator
from fedtune.strategies.base import server_strategy
from fedtune.types import AdapterState, ClientUpdate

if TYPE_CHECKING:
    from fedtune.engines.federation import Federation
    from fedtune.recipes.federated import RunResult

POOLING = (
    "GEM (arXiv:2506.04344): append the k vectors of gem_tokens.safetensors (key 'tokens', [k, hidden]) "
    "after the text's token embeddings (no BOS/EOS added), attention causal except that the k tokens do "
    "not see each other; the embedding is the mean of their final-layer hidden states "
    "(fedtune.embedding.gem.embed_ids)"
)


def run_embedding(
    cfg: ExperimentConfig,
    run_dir: Path,
    t_start: float,
    resume: bool,
    progress: bool,
    after_round: Callable[[int], None] | None,
    console: Console,
    federation: Callable[[ExperimentConfig], Federation] | None = None,
    trackers: Sequence[Tracker] = (),
) -> RunResult:
    """Run (or resume) an embedding experiment in `run_dir` (made by `run_federated`, which calls
    this for `task: embedding`); in-process only (`federation` must be None)."""
    from fedtune.recipes.federated import RunResult

    if federation is not None:  # `fedtune validate` refuses other engines (embedding.checks)
        raise FedtuneError("task: embedding runs in-process only (engine.name: inprocess)")
    # 1. parties, model + adapter + GEM tokens, strategy
    k = cfg.embedding.num_tokens
    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    parties = build_parties(cfg, tokenizer, cfg.data.block_size - k)
    ids = list(parties)
    written, (cfg, _, _) = cfg, run_precision(cfg)  # config.yaml keeps 'auto' (resolved per device)
    model, adapter_cfg = build_adapted_model(cfg, model_dir, {}, tokenizer)
    device = next(model.parameters()).device
    tokens = torch.nn.Parameter(init_tokens(model, k, torch_generator(cfg.seed, "gem-init")).to(device))
    tokens.requires_grad_(False)
    ctx = components.run_context(cfg, ids, lora_scale(model))
    strategy = server_strategy(components.build_strategy(cfg, ctx), cfg.strategy.name)
    caps, spec = strategy.capabilities, components.build_train_spec(cfg)
    bs, bf16, knn = cfg.evaluation.batch_size, spec.bf16, cfg.embedding.knn_topics
    metrics_path = run_dir / io.METRICS

    # 2. start or resume
    if resume:
        ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
        start, global_state, sstate, cum = ckpt["round"] + 1, ckpt["global"], ckpt["strategy_state"], ckpt["cum"]
        io.write_jsonl(metrics_path, [r for r in io.read_jsonl(metrics_path) if r["round"] <= ckpt["round"]])
    else:
        io.write_atomic(run_dir / io.CONFIG, config_to_yaml(written))
        global_state = gem_state(model, tokens)
        sstate, start, cum = strategy.init_state(global_state), 1, 0
        per, pooled = evaluate_states(model, tokens, dict.fromkeys(ids, global_state), parties, bs, bf16, knn)
        summary = {"round": 0, "client": None, "task": "embedding", "gem_tokens": k, **_summary(per, pooled)}
        summary.update(
            setup_seconds=time.perf_counter() - t_start, train_pairs={c: len(p.train) for c, p in parties.items()}
        )
        summary["pairs_dropped"] = {c: p.dropped for c, p in parties.items() if p.dropped}
        _log(metrics_path, trackers, 0, [{"round": 0, "client": c, **m} for c, m in per.items()], summary)

    # 3. rounds
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_round(ids, cfg.sampling, cfg.seed, rnd, cfg.randomness())
        sent = strategy.configure(rnd, sampled, sstate)
        updates: list[ClientUpdate] = []
        recs: list[dict[str, Any]] = []
        for cid in sampled:
            delta, m = local_gem_train_(
                model, tokens, sent[cid], parties[cid].train, spec, cfg.embedding.ntp_weight, cfg.seed, rnd, cid
            )
            down, up = len(serialize(sent[cid])), len(serialize(delta))  # the real payloads' lengths
            updates.append(ClientUpdate(cid, delta, len(parties[cid].train), m, up, down))
            recs.append(
                {"round": rnd, "client": cid, **m, "bytes_up": up * caps.transmits, "bytes_down": down * caps.transmits}
            )
        t_agg = time.perf_counter()
        agg = strategy.aggregate(rnd, updates, sstate)
        global_state, sstate = agg.global_state, agg.state
        up, down = sum(r["bytes_up"] for r in recs), sum(r["bytes_down"] for r in recs)
        cum += up + down
        t_train = time.perf_counter()
        summary = {"round": rnd, "client": None, "bytes_up": up, "bytes_down": down, "cum_bytes": cum, "failures": 0}
        summary.update(train_seconds=t_agg - t0, aggregate_seconds=t_train - t_agg)
        if updates:
            summary["train_loss"] = sum(u.metrics["train_loss"] for u in updates) / len(updates)
        if rnd == cfg.rounds or rnd % cfg.evaluation.every == 0:
            states = strategy.configure(rnd + 1, ids, sstate) if caps.personalized else dict.fromkeys(ids, global_state)
            per, pooled = evaluate_states(model, tokens, states, parties, bs, bf16, knn)
            by = {r["client"]: r for r in recs}
            recs = [{**by.get(c, {"round": rnd, "client": c}), **m} for c, m in per.items()]
            summary.update(_summary(per, pooled), eval_seconds=time.perf_counter() - t_train)
        summary["wall_seconds"] = time.perf_counter() - t0
        _log(metrics_path, trackers, rnd, recs, summary)
        io.save_checkpoint(
            run_dir / io.CHECKPOINT, {"round": rnd, "global": global_state, "strategy_state": sstate, "cum": cum}
        )
        if progress:
            console.print(_line(rnd, cfg.rounds, summary), highlight=False)
        if after_round is not None:
            after_round(rnd)

    # 4. export: the global model (or each party's own) as PEFT LoRA + the GEM vectors
    base = str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir
    exports = {"global": global_state} if caps.has_global else dict(strategy.configure(cfg.rounds + 1, ids, sstate))
    for name, state in exports.items():
        out = run_dir / "adapters" / adapter_folder(name)
        export_gem(model, state, out, base, adapter_cfg, k, cfg.data.block_size - k)
    records = io.read_jsonl(metrics_path)
    rounds = [r for r in records if r["client"] is None and r["round"] > 0]
    setup = next((r.get("setup_seconds", 0.0) for r in records if r["client"] is None and r["round"] == 0), 0.0)
    totals = {k: sum(r.get(k, 0.0) for r in rounds) for k in ("train_seconds", "aggregate_seconds", "eval_seconds")}
    facts = {
        "name": cfg.name,
        "task": "embedding",
        "strategy": cfg.strategy.name,
        "status": "complete",
        "final": records[-1],
        "wall_seconds": time.perf_counter() - t_start,  # this process's (a resumed run: since it resumed)
        "setup_seconds": setup,
        "round_seconds": sum(r.get("wall_seconds", 0.0) for r in rounds),
        **totals,
        "cum_bytes": cum,
        "failures": 0,  # every sampled party trains in this process
    }
    io.write_atomic(run_dir / io.SUMMARY, json.dumps(facts, indent=2, sort_keys=True))
    return RunResult(run_dir, records, max(r["round"] for r in records))


def export_gem(model: Any, state: AdapterState, out: Path, base: str, adapter_cfg: Any, k: int, limit: int) -> None:
    """out/: the PEFT adapter (adapter_config.json + weights), gem_tokens.safetensors and gem.json
    (k, `limit`: the tokens per text it was trained and scored with, the pooling in words)."""
    from safetensors.torch import save_file

    from fedtune.adapters import adapter_of

    lora = {key: v for key, v in state.items() if key != GEM_KEY}
    adapter_of(model).export(model, lora, out, base, adapter_cfg, None)
    save_file({"tokens": state[GEM_KEY].contiguous()}, str(out / GEM_TOKENS_FILE))
    write_atomic(
        out / GEM_CONFIG_FILE, json.dumps({"num_tokens": k, "max_tokens": limit, "pooling": POOLING}, indent=1)
    )


def _summary(per: dict[str, dict[str, float]], pooled: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {f"pooled_{m}": v for m, v in pooled.items()}
    for m in ("recall@1", "recall@10", "mrr", "ndcg@10", "lm_loss"):
        values = [x[m] for x in per.values()]
        out[f"mean_{m}"] = sum(values) / len(values)
        out[f"worst_{m}"] = max(values) if m == "lm_loss" else min(values)
    return out


def _log(
    path: Path, trackers: Sequence[Tracker], rnd: int, recs: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    io.append_jsonl(path, [*recs, summary])
    for t in trackers:
        t.log(rnd, summary, recs)


def _line(rnd: int, rounds: int, s: dict[str, Any]) -> str:
    loss = f"train loss {s['train_loss']:.3f}" if "train_loss" in s else "no party trained"
    if "pooled_mrr" not in s:
        return f"round {rnd}/{rounds}: {loss}"
    return (
        f"round {rnd}/{rounds}: {loss}; pooled recall@1 {s['pooled_recall@1']:.3f} "
        f"MRR {s['pooled_mrr']:.3f} nDCG@10 {s['pooled_ndcg@10']:.3f}; mean party MRR {s['mean_mrr']:.3f}"
    )


def print_embedding_summary(run: RunResult, console: Console) -> None:
    """Per party: retrieval of its test pairs at round 0 (base) and at the end; pooled in the caption."""
    from rich.table import Table

    first = {r["client"]: r for r in run.records if r["round"] == 0 and r.get("client") is not None}
    last = {r["client"]: r for r in run.records if r.get("client") is not None and "mrr" in r}
    t = Table(title=f"{run.run_dir.name}: GEM retrieval of each party's test pairs (base = round 0)")
    for col in ("party", "base R@1", "final R@1", "base MRR", "final MRR", "final nDCG@10"):
        t.add_column(col, justify="left" if col == "party" else "right")
    for cid, r in sorted(last.items()):
        b = first.get(cid, {})
        t.add_row(
            cid,
            *(
                f"{x:.3f}" if x is not None else "-"
                for x in (b.get("recall@1"), r["recall@1"], b.get("mrr"), r["mrr"], r["ndcg@10"])
            ),
        )
    rounds = [r for r in run.records if r.get("client") is None and "pooled_mrr" in r]
    if rounds:
        p0, p1 = rounds[0], rounds[-1]
        t.caption = (
            f"pooled test ({int(p1['pooled_retrieval_docs'])} documents): MRR {p0['pooled_mrr']:.3f} -> "
            f"{p1['pooled_mrr']:.3f}, nDCG@10 {p0['pooled_ndcg@10']:.3f} -> {p1['pooled_ndcg@10']:.3f}"
            + (f", 1-NN topic accuracy {p1['pooled_knn_topic_acc']:.3f}" if "pooled_knn_topic_acc" in p1 else "")
        )
    console.print(t)
    console.print(f"run dir: {run.run_dir}  (adapters/<name>: PEFT adapter + {GEM_TOKENS_FILE}; `fedtune embed`)")

"""The federated loop, top to bottom: data -> partition -> model + adapter -> rounds of
(configure -> encode -> clients train -> decode -> aggregate -> evaluate -> checkpoint) -> report."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune import components
from fedtune.adapters.lora_sb import inject_lora_sb_
from fedtune.adapters.moe_lora import inject_moe_lora_, is_moe, save_moe_adapter
from fedtune.codecs import serialize
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.data.blocks import Shard, make_shards, pooled
from fedtune.data.partition import partition
from fedtune.data.sources import load_corpus
from fedtune.engines.inprocess import InProcessEngine, attackers, corrupt_shard
from fedtune.errors import FedtuneError, ResumeError, TrainingDivergedError
from fedtune.evaluation.metrics import summarize
from fedtune.models.adapters import (
    export_peft,
    get_state,
    inject_,
    lora_config,
    lora_scale,
    trainable_keys,
)
from fedtune.models.load import load_model, load_tokenizer, model_type, resolve_model_dir
from fedtune.report import io
from fedtune.report.plots import plot_runs
from fedtune.report.summary import run_table
from fedtune.seeding import derive_seed, numpy_rng, torch_generator
from fedtune.types import AdapterState, ClientFailure, ClientUpdate
from fedtune.validation import screen

AfterRound = Callable[[int], None]


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]]
    final_round: int


def prepare_run_dir(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.run_dir())
    if resume:
        if not (run_dir / io.CHECKPOINT).exists():
            raise ResumeError(f"{run_dir} has no {io.CHECKPOINT}; nothing to resume (run without --resume)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FedtuneError(
                f"output dir {run_dir} already holds a run; use `fedtune run --resume {run_dir}` to "
                "continue it, --overwrite to replace it, or --set name=OTHER"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_shards(cfg: ExperimentConfig, tokenizer: Any) -> dict[str, Shard]:
    corpus = load_corpus(cfg.data)
    parts = partition(corpus, cfg.partition, cfg.seed)
    return make_shards(parts, tokenizer, cfg.data, cfg.seed)


def rank_per_client(cfg: ExperimentConfig, client_ids: list[str]) -> dict[str, int]:
    """adapter.ranks, in client-id order, as {client: rank} ({} when all clients share adapter.r)."""
    ranks = cfg.adapter.ranks
    if ranks is None:
        return {}
    if len(ranks) != len(client_ids):
        from fedtune.errors import ConfigError, Problem

        raise ConfigError(
            [
                Problem(
                    "adapter.ranks",
                    ranks,
                    f"one rank per client is needed; there are {len(client_ids)} clients ({', '.join(client_ids)})",
                    f"give {len(client_ids)} ranks",
                )
            ]
        )
    return dict(zip(client_ids, ranks))


def experts_per_client(cfg: ExperimentConfig, client_ids: list[str]) -> dict[str, int]:
    """adapter.experts as {client: count} when given per client ({} otherwise)."""
    counts = cfg.adapter.experts
    if cfg.adapter.kind != "moe_lora" or not isinstance(counts, list):
        return {}
    if len(counts) != len(client_ids):
        from fedtune.errors import ConfigError, Problem

        raise ConfigError(
            [
                Problem(
                    "adapter.experts",
                    counts,
                    f"one expert count per client is needed; there are {len(client_ids)} clients "
                    f"({', '.join(client_ids)})",
                    f"give {len(client_ids)} counts, or one number for all",
                )
            ]
        )
    return dict(zip(client_ids, counts))


def target_names(model: Any, adapter_cfg: Any) -> list[str]:
    """Explicit target module names ('all-linear' = every Linear but the LM head)."""
    if not isinstance(adapter_cfg.target_modules, str):
        return sorted(adapter_cfg.target_modules)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def sb_init_blocks(cfg: ExperimentConfig, shards: dict[str, Shard], tokenizer: Any) -> torch.Tensor:
    """Data for LoRA-SB's gradient estimate: only what the server may see (adapter.sb_init)."""
    how, n = cfg.adapter.sb_init, cfg.adapter.sb_init_blocks
    if how.startswith("source:"):
        return sb_public_blocks(cfg, tokenizer)
    cid = how.split(":", 1)[1] if ":" in how else next(iter(shards))
    if cid not in shards:
        from fedtune.errors import ConfigError, Problem

        raise ConfigError([Problem("adapter.sb_init", how, "unknown client", f"use one of: {', '.join(shards)}")])
    shard = shards[cid]
    return (shard.val if shard.val.shape[0] > 0 else shard.train)[:n]


def sb_public_blocks(cfg: ExperimentConfig, tokenizer: Any) -> torch.Tensor:
    """LoRA-SB init data from a public corpus (adapter.sb_init = 'source:<name>')."""
    from fedtune.data.blocks import pack

    how, n = cfg.adapter.sb_init, cfg.adapter.sb_init_blocks
    if not how.startswith("source:"):
        from fedtune.errors import ConfigError, Problem

        raise ConfigError([Problem("adapter.sb_init", how, "needs a public corpus here", "use source:<name>")])
    public = load_corpus(cfg.data.model_copy(update={"source": how.split(":", 1)[1], "labels": None}))
    return pack([str(t) for t in public["text"][: 4 * n]], tokenizer, cfg.data.block_size)[:n]


def sample_clients(client_ids: list[str], fraction: float, min_clients: int, seed: int, rnd: int) -> list[str]:
    n = len(client_ids)
    k = min(n, max(min_clients, round(fraction * n)))
    if k == n:
        return list(client_ids)
    picked = numpy_rng(seed, "sample", rnd).choice(n, size=k, replace=False)
    return sorted(client_ids[i] for i in picked)


def eval_records(
    rnd: int,
    strategy: Any,
    engine: Any,
    client_ids: list[str],
    global_state: AdapterState,
    sstate: Any,
    ood: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-client test metrics (computed where the data is, by the engine): the global model,
    the personal model (if the strategy personalizes), and test_* = the model the client ends with."""
    out: dict[str, dict[str, float]] = {cid: {} for cid in client_ids}
    if strategy.has_global or rnd == 0:
        res = engine.evaluate({cid: global_state for cid in client_ids})
        for cid, r in res.items():  # a client that is down is missing here
            out[cid].update(global_loss=r["loss"], global_ppl=r["ppl"], test_tokens=r["tokens"])
    if strategy.personalized and rnd > 0:
        res = engine.evaluate(dict(strategy.configure(rnd + 1, client_ids, sstate)))
        for cid, r in res.items():
            out[cid].update(personal_loss=r["loss"], personal_ppl=r["ppl"], test_tokens=r["tokens"])
    for cid in client_ids:
        kind = "personal" if "personal_loss" in out[cid] else "global"
        if f"{kind}_loss" in out[cid]:
            out[cid].update(test_loss=out[cid][f"{kind}_loss"], test_ppl=out[cid][f"{kind}_ppl"])
    if ood:  # the model each client ends with, on the mixture of all clients' test data
        personal = strategy.personalized and rnd > 0
        states = dict(strategy.configure(rnd + 1, client_ids, sstate)) if personal else {}
        res = engine.evaluate({cid: states.get(cid, global_state) for cid in client_ids}, split="ood")
        for cid, r in res.items():
            out[cid].update(ood_loss=r["loss"], ood_ppl=r["ppl"])
    return out


@dataclass
class Federation:
    """What the loop needs from where the clients live: their ids, the server's copy of the base
    model with the adapter (initial state, export), and a factory for the engine."""

    client_ids: list[str]
    model: Any
    model_dir: str
    adapter_cfg: Any
    client_ranks: dict[str, int]
    make_engine: Callable[[Any, Any, Any], Any]


def build_adapted_model(
    cfg: ExperimentConfig, model_dir: str, client_ranks: dict[str, int], sb_blocks: Callable[[], torch.Tensor]
) -> tuple[Any, Any]:
    """Load the base model once and add the adapter (seeded; LoRA-SB from its init data)."""
    model = load_model(model_dir, cfg.model)
    r_max = max(client_ranks.values()) if client_ranks else None
    adapter_cfg = lora_config(cfg.adapter, model_type(model_dir), r=r_max)
    if cfg.adapter.kind == "lora_sb":
        init_lr = cfg.adapter.sb_init_lr if cfg.adapter.sb_init_lr is not None else cfg.train.lr
        model = inject_lora_sb_(model, target_names(model, adapter_cfg), cfg.adapter.r, sb_blocks(), init_lr)
    elif cfg.adapter.kind == "moe_lora":
        a = cfg.adapter
        model = inject_moe_lora_(
            model,
            num_experts=a.max_experts(),
            r=a.r,
            alpha=a.alpha,
            top_k=a.top_k,
            router=a.router,
            dropout=a.dropout,
            modules=a.moe_modules,
            seed=derive_seed(cfg.seed, "adapter-init"),
        )
    else:
        model = inject_(model, adapter_cfg, derive_seed(cfg.seed, "adapter-init"))
    return model, adapter_cfg


def inprocess_federation(cfg: ExperimentConfig) -> Federation:
    """All clients in this process (data loaded and checked before any model weights load)."""
    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    shards = load_shards(cfg, tokenizer)
    client_ids = list(shards)
    client_ranks = rank_per_client(cfg, client_ids)
    model, adapter_cfg = build_adapted_model(
        cfg, model_dir, client_ranks, lambda: sb_init_blocks(cfg, shards, tokenizer)
    )

    experts = experts_per_client(cfg, client_ids)

    bad = attackers(client_ids, cfg.attack.fraction, cfg.seed) if cfg.attack.kind != "none" else set()

    def make_engine(strategy: Any, codec: Any, spec: Any) -> InProcessEngine:
        train = {"pooled": pooled(shards)} if strategy.pools_data else dict(shards)
        if cfg.attack.kind == "data":
            train.update({cid: corrupt_shard(train[cid], cfg.seed) for cid in bad if cid in train})
        init = get_state(model)
        keep = strategy.private_keys(init) if hasattr(strategy, "private_keys") else set()
        engine = InProcessEngine(
            model,
            train,
            codec,
            spec,
            cfg.seed,
            getattr(strategy, "client_penalty", None),
            eval_shards=shards,
            eval_batch_size=cfg.evaluation.batch_size,
            private_init={cid: {k: init[k] for k in sorted(keep)} for cid in client_ids} if keep else None,
            expert_counts=experts,
            client_fn=getattr(strategy, "client_train", None),
            dropout=cfg.sampling.dropout,
            stragglers=(cfg.sampling.straggler_fraction, cfg.sampling.straggler_slowdown, cfg.sampling.deadline),
            attack=(cfg.attack.kind, cfg.attack.scale, bad) if bad else None,
            secure_aggregation=cfg.secure_aggregation,
        )
        # the centralized baseline has to collect the raw training tokens once
        engine.collected_bytes = _data_bytes(shards) if strategy.pools_data else 0
        return engine

    return Federation(client_ids, model, model_dir, adapter_cfg, client_ranks, make_engine)


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
    console = console or Console(stderr=True)
    run_dir = prepare_run_dir(cfg, resume, overwrite)

    # 1. clients, data and the adapted base model (data fails before any weights load)
    fed = (federation or inprocess_federation)(cfg)
    client_ids, model = fed.client_ids, fed.model
    init_state = get_state(model)

    # 2. components
    strategy = components.build_strategy(
        cfg, lora_scale=lora_scale(model), seed=cfg.seed, client_ranks=fed.client_ranks
    )
    codec = components.build_codec(cfg)
    down_codec = components.build_codec(cfg, downlink=True)
    spec = components.build_train_spec(cfg)
    engine = fed.make_engine(strategy, codec, spec)
    engine.down_codec = down_codec
    engine.secure_weight = getattr(strategy, "secure_weight", float)  # a client's weight in a masked sum

    # 3. start or resume
    if resume:
        ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
        start, global_state, sstate = ckpt["round"] + 1, ckpt["global"], ckpt["strategy_state"]
        codec_states, records = ckpt["codec_states"], ckpt["records"]
        if hasattr(engine, "private"):
            engine.private = ckpt.get("client_private", {})
        console.print(f"resuming {run_dir} after round {ckpt['round']}")
    else:
        io.write_atomic(run_dir / io.CONFIG, config_to_yaml(cfg))
        global_state, sstate, codec_states = init_state, strategy.init_state(init_state), {}
        base = eval_records(0, strategy, engine, client_ids, init_state, sstate, cfg.evaluation.ood)
        records = [{"round": 0, "client": cid, **base[cid]} for cid in client_ids]
        records.append({"round": 0, "client": None, **_round_summary(base, 0, 0, 0.0, 0)})
        if getattr(engine, "attack", None):  # who the simulated attackers are (e.g. to judge what Krum kept)
            records[-1]["attackers"] = sorted(engine.attack[2])
        start = 1
        io.write_jsonl(run_dir / io.METRICS, records)

    # 4. rounds
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    with bars:
        round_task = bars.add_task("rounds", total=cfg.rounds, completed=start - 1)
        step_task = bars.add_task("client", total=1)

        def on_step(cid: str, step: int, total: int, loss: float) -> None:
            bars.update(step_task, description=f"client {cid} loss {loss:.3f}", completed=step, total=total)

        for rnd in range(start, cfg.rounds + 1):
            if any("stopped" in r for r in records if r.get("client") is None):
                break  # resumed after the budget stopped the run: nothing more to do
            t0 = time.perf_counter()
            sampled = sample_clients(client_ids, cfg.sampling.fraction, cfg.sampling.min_clients, cfg.seed, rnd)
            trainers = ["pooled"] if strategy.pools_data else sampled
            if strategy.pools_data:
                engine.spec = _scaled(spec, len(sampled))

            # server -> clients
            sent = strategy.configure(rnd, trainers, sstate)
            payloads = {}
            for cid in trainers:
                payloads[cid], codec_states["down:" + cid] = down_codec.encode(
                    sent[cid], codec_states.get("down:" + cid), torch_generator(cfg.seed, "codec-down", rnd, cid)
                )

            # clients train and reply
            if cfg.secure_aggregation and hasattr(strategy, "client_transform"):  # e.g. DP clipping
                engine.client_transform = lambda d, r, c, parts, st=sstate: strategy.client_transform(
                    d, st, r, c, len(parts)
                )
                engine.transform_config = strategy.client_transform_config(sstate)  # what Flower clients get
            try:
                replies, codec_states = engine.run_clients(rnd, payloads, codec_states, on_step)
            except TrainingDivergedError as e:
                raise TrainingDivergedError(
                    f"round {rnd}: {e}. The last good checkpoint (round {rnd - 1}) is kept in {run_dir}; "
                    f"fix the config and resume with `fedtune run --resume {run_dir} --set train.lr=...`"
                ) from None
            updates = [r for r in replies if isinstance(r, ClientUpdate)]
            failures = [r for r in replies if isinstance(r, ClientFailure)]
            # reject NaN/Inf, unknown or missing keys, wrong shapes or dtypes, oversized payloads
            max_up = int(cfg.sampling.max_update_mb * 1e6) if cfg.sampling.max_update_mb else None
            presummed = getattr(engine, "secure_result", None)  # Flower's SecAgg+ unmasks the sum itself
            expected = None if hasattr(strategy, "client_train") or presummed is not None else _expected_delta
            updates, rejected = screen(updates, sent, expected, max_up, masked=cfg.secure_aggregation)
            failures += rejected
            client_updates = updates  # what each client sent (records, bytes)
            if cfg.secure_aggregation and updates:  # the strategy sees only the unmasked sum
                updates = [
                    presummed
                    if presummed is not None
                    else secure_sum(updates, getattr(strategy, "secure_weight", float))
                ]

            # aggregate (too few replies: keep the global model; the failures are recorded)
            skipped = len(client_updates) < cfg.sampling.min_updates
            if not skipped:
                if getattr(strategy, "uses_engine", False):  # e.g. PCL's trust from peers' validation loss
                    global_state, sstate = strategy.aggregate(rnd, updates, sstate, engine=engine)
                else:
                    global_state, sstate = strategy.aggregate(rnd, updates, sstate)
            wall = time.perf_counter() - t0

            # bytes this round (every number is the length of a real payload)
            wire = int(strategy.transmits)  # local / centralized: nothing crosses the network
            # the centralized baseline has to collect the raw training tokens once
            up = wire * sum(u.bytes_up for u in client_updates) + (engine.collected_bytes if rnd == 1 else 0)
            up += wire * sum(f.bytes_up for f in failures)  # rejected uploads crossed the network too
            down = wire * sum(len(p) for p in payloads.values())
            if not skipped and isinstance(sstate, dict):  # bytes a strategy moves besides the adapters
                up += int(sstate.get("round_metrics", {}).get("extra_bytes_up", 0))
                down += int(sstate.get("round_metrics", {}).get("extra_bytes_down", 0))
            spent_before = next(r for r in reversed(records) if r.get("client") is None).get("cum_bytes", 0)
            over_budget = cfg.budget_mb is not None and spent_before + up + down >= cfg.budget_mb * 1e6
            strategy_stop = isinstance(sstate, dict) and sstate.get("round_metrics", {}).get("stop")
            sample_dp = sample_epsilons(records, client_updates, cfg.train.dp_sgd) if cfg.train.dp_sgd else {}
            if cfg.train.dp_sgd and cfg.train.dp_sgd.target_epsilon is not None and not strategy_stop:
                over = sorted(c for c, (_, nxt) in sample_dp.items() if nxt > cfg.train.dp_sgd.target_epsilon)
                if over:
                    strategy_stop = (
                        f"train.dp_sgd.target_epsilon = {cfg.train.dp_sgd.target_epsilon:g}: another round would "
                        f"give client {over[0]} a sample-level epsilon above it"
                    )
            over_budget = over_budget or bool(strategy_stop)  # e.g. DP's target epsilon

            # evaluate, log
            last = rnd == cfg.rounds or over_budget
            evals = (
                eval_records(rnd, strategy, engine, client_ids, global_state, sstate, cfg.evaluation.ood)
                if last or rnd % cfg.evaluation.every == 0
                else {cid: {} for cid in client_ids}
            )
            by_id = {u.client_id: u for u in client_updates}
            fail_ids = {f.client_id: f for f in failures}
            for cid in client_ids:
                rec: dict[str, Any] = {"round": rnd, "client": cid, "sampled": cid in sampled, **evals[cid]}
                if cid in by_id:
                    u = by_id[cid]
                    rec.update(bytes_up=wire * u.bytes_up, bytes_down=wire * u.bytes_down, **u.metrics)
                    if cid in sample_dp:
                        rec["sample_epsilon"] = sample_dp[cid][0]
                if cid in fail_ids:
                    f = fail_ids[cid]
                    rec.update(failure=f.reason, bytes_down=wire * f.bytes_down, bytes_up=wire * f.bytes_up)
                records.append(rec)
            prev = next(r for r in reversed(records) if r.get("client") is None)
            summary = _round_summary(evals, up, down, wall, len(failures), prev.get("cum_bytes", 0))
            if over_budget:
                summary["stopped"] = strategy_stop or (
                    f"budget_mb = {cfg.budget_mb:g} reached ({summary['cum_bytes'] / 1e6:.3f} MB)"
                )
            if skipped:
                summary["skipped"] = (
                    f"{len(client_updates)} updates < sampling.min_updates = {cfg.sampling.min_updates}"
                )
            if client_updates:
                summary["train_loss"] = sum(u.metrics["train_loss"] for u in client_updates) / len(client_updates)
            if any("sim_time" in u.metrics for u in client_updates) and (
                cfg.sampling.straggler_fraction > 0 or cfg.sampling.deadline is not None
            ):  # the round lasts until the slowest reply, or until the deadline if someone missed it
                slowest = max(u.metrics["sim_time"] for u in client_updates)
                missed = any(f.reason.startswith("missed the deadline") for f in failures)
                summary["sim_round_time"] = float(cfg.sampling.deadline) if missed else slowest
            if any("codec_skipped" in u.metrics for u in client_updates):  # lazy uploads (AQUILA)
                summary["uploads_skipped"] = int(sum(u.metrics.get("codec_skipped", 0) for u in client_updates))
            if isinstance(sstate, dict):
                summary.update(sstate.get("round_metrics", {}))  # e.g. FedIT's aggregation error
            if cfg.train.dp_sgd is not None:  # the worst client's epsilon so far (each only grows)
                now = [e for e, _ in sample_dp.values()] + [prev.get("sample_epsilon", 0.0)]
                summary.update(
                    sample_epsilon=max(now),
                    sample_dp_delta=cfg.train.dp_sgd.delta,
                    sample_dp_accounting="RDP, Poisson-subsampled Gaussian per local step, composed over each "
                    f"client's steps, sigma={cfg.train.dp_sgd.noise_multiplier:g}",
                )
            records.append({"round": rnd, "client": None, **summary})

            # checkpoint: everything needed to continue exactly
            io.write_jsonl(run_dir / io.METRICS, records)
            io.save_checkpoint(
                run_dir / io.CHECKPOINT,
                {
                    "round": rnd,
                    "global": global_state,
                    "strategy_state": sstate,
                    "codec_states": codec_states,
                    "client_private": getattr(engine, "private", {}),
                    "records": records,
                },
            )
            bars.update(round_task, completed=rnd)
            if after_round is not None:
                after_round(rnd)
            if over_budget:
                console.print(f"[yellow]stopping after round {rnd}: {summary['stopped']}[/yellow]")
                break

    # 5. export + report
    _export(run_dir, strategy, engine, global_state, sstate, client_ids, fed, cfg)
    plot_runs({cfg.name: records}, run_dir / "plots")
    io.write_atomic(run_dir / io.SUMMARY, _summary_json(cfg, records))
    return RunResult(run_dir, records, max(r["round"] for r in records))


def secure_sum(updates: list[ClientUpdate], weight: Callable[[int], float] = float) -> ClientUpdate:
    """The one update a strategy sees under secure aggregation: sum_k w_k delta_k / sum_k w_k
    (w_k = n_k, the FedAvg weight, unless the strategy says otherwise), recovered from the masked
    fixed-point uploads (the masks cancel in the sum)."""
    from fedtune.secagg import unmask_sum

    n = sum(weight(u.num_examples) for u in updates)
    total = unmask_sum([u.delta for u in updates])
    return ClientUpdate("secure-sum", {k: v / n for k, v in total.items()}, n, {"train_loss": 0.0}, 0, 0)


def sample_epsilons(
    records: list[dict[str, Any]], updates: list[ClientUpdate], dp: Any
) -> dict[str, tuple[float, float]]:
    """Sample-level DP-SGD accounting: for each client that trained this round, (epsilon after
    its steps so far, epsilon after one more round like this one), from the steps recorded in
    earlier rounds (so a resumed run reproduces them exactly)."""
    from fedtune.strategies.dp import epsilon

    out = {}
    for u in updates:
        if "dp_steps" not in u.metrics:
            continue
        prior = sum(r.get("dp_steps", 0.0) for r in records if r.get("client") == u.client_id)
        steps, q = int(prior + u.metrics["dp_steps"]), float(u.metrics["dp_rate"])
        out[u.client_id] = (
            epsilon(q, dp.noise_multiplier, steps, dp.delta),
            epsilon(q, dp.noise_multiplier, steps + int(u.metrics["dp_steps"]), dp.delta),
        )
    return out


def _expected_delta(sent: AdapterState) -> dict[str, torch.Size]:
    """An adapter delta has exactly the trainable keys a client received, at their shapes."""
    return {k: sent[k].shape for k in trainable_keys(sent)}


def _scaled(spec: Any, factor: int) -> Any:
    from dataclasses import replace

    return replace(spec, steps=spec.steps * factor) if spec.epochs is None else spec


def _data_bytes(shards: dict[str, Shard]) -> int:
    """Bytes of raw training tokens the centralized baseline must collect (int32 on the wire)."""
    return sum(len(serialize({"tokens": s.train.to(torch.int32)})) for s in shards.values())


def _round_summary(
    evals: dict[str, dict[str, float]], up: int, down: int, wall: float, failures: int, cum_before: int = 0
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bytes_up": up,
        "bytes_down": down,
        "cum_bytes": cum_before + up + down,
        "wall_seconds": wall,
        "failures": failures,
    }
    done = [c for c in evals if "test_ppl" in evals[c]]
    ppl = [evals[c]["test_ppl"] for c in done]
    if ppl:
        w = [evals[c]["test_tokens"] for c in done]
        s = summarize(ppl, w)
        out.update(mean_ppl=s["mean"], weighted_mean_ppl=s["weighted_mean"], worst_ppl=s["worst"])
    ood = [evals[c]["ood_ppl"] for c in evals if "ood_ppl" in evals[c]]
    if ood:
        out["ood_mean_ppl"] = sum(ood) / len(ood)
    return out


def _export(
    run_dir: Path,
    strategy: Any,
    engine: Any,
    global_state: AdapterState,
    sstate: Any,
    client_ids: list[str],
    fed: Federation,
    cfg: ExperimentConfig,
) -> None:
    """PEFT-format adapters (global and/or one per client); a mixture-of-experts adapter, which
    PEFT cannot express, as moe_adapter.safetensors + moe_config.json (load_moe_adapter)."""
    model_dir = fed.model_dir
    base = str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir
    private = getattr(engine, "private_of", lambda cid: {})
    counts = getattr(engine, "expert_counts", {})

    def write(state: AdapterState, name: str, cid: str | None) -> None:
        out = run_dir / "adapters" / name.replace("/", "_")
        if is_moe(fed.model):
            info = {**fed.model.__dict__["_fedtune_moe"], "base_model_name_or_path": base}
            info["client_experts"] = counts.get(cid) if cid else None
            save_moe_adapter(state, info, out)
        else:
            export_peft(state, fed.adapter_cfg, base, out)

    if strategy.has_global:
        write(global_state, "global", None)
    if strategy.personalized:
        personal = strategy.configure(cfg.rounds + 1, client_ids, sstate)
        for cid in client_ids:
            write({**personal[cid], **private(cid)}, cid, cid)


def _summary_json(cfg: ExperimentConfig, records: list[dict[str, Any]]) -> str:
    import json

    from fedtune.report.summary import client_rows, round_rows

    rr = round_rows(records)
    return json.dumps(
        {
            "name": cfg.name,
            "strategy": cfg.strategy.name,
            "rounds": cfg.rounds,
            "status": "complete",
            "stopped": next((r["stopped"] for r in rr if "stopped" in r), None),
            "clients": client_rows(records),
            "final": rr[-1] if rr else {},
            "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in rr),
        },
        indent=2,
        sort_keys=True,
    )


def print_summary(run: RunResult, console: Console) -> None:
    console.print(run_table(run.run_dir.name, run.records))
    console.print(f"run dir: {run.run_dir}  (plots/, adapters/, metrics.jsonl)")

"""What every engine builds the same way from a config: the clients' data shards, per-client
ranks and adapter variants (a mixture's expert counts), and the base model with its adapter
(loaded once per process)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.adapters import build_adapter
from fedtune.adapters.base import InjectContext, adapter_kind
from fedtune.client.train import model_device
from fedtune.components import per_client_problems, strategy_capabilities
from fedtune.config import ExperimentConfig
from fedtune.data.blocks import Corpus, Shard, pack
from fedtune.data.canaries import canary_token_ids, run_canaries
from fedtune.data.partition import partition_ids
from fedtune.data.report import stats_summary
from fedtune.data.shards import ClientShards
from fedtune.data.sources import load_corpus
from fedtune.engines.capabilities import Engine
from fedtune.errors import ConfigError, Problem
from fedtune.models.adapters import lora_config, trainable_parameter_count
from fedtune.models.load import load_model, model_type, resolve_device
from fedtune.models.precision import Precision, choose_precision, precision_warning
from fedtune.seeding import derive_seed
from fedtune.strategies.base import StrategyCore


def load_shards(cfg: ExperimentConfig, tokenizer: Any) -> tuple[ClientShards, dict[str, Any]]:
    """Every client's shard (checked now, built on first use), and what the round-0 record says
    about the data (what was cut)."""
    import json

    ds = load_corpus(cfg.data)
    files = json.loads(ds.info.description) if ds.info.description else None
    docs = partition_ids(ds, cfg.partition, cfg.seed)
    dp = cfg.train.dp_sgd
    doc_unit = dp is not None and dp.unit == "document"
    a, canaries = cfg.audit, None
    if a is not None:  # audit canaries: made (or read back) before any shard is built
        ids = canary_token_ids(tokenizer)
        run = Path(cfg.run_dir())
        canaries = run_canaries(run, a.canaries, a.clients, a.seed, cfg.data.block_size, ids, list(docs))
    extra = canaries.train_blocks() if canaries is not None else None
    shards = ClientShards(docs, Corpus.of(ds), tokenizer, cfg.data, cfg.seed, doc_unit, extra_train=extra)
    return shards, stats_summary(shards.stats, files)


def rank_per_client(cfg: ExperimentConfig, client_ids: list[str]) -> dict[str, int]:
    """adapter.ranks, in client-id order, as {client: rank} ({} when all clients share adapter.r)."""
    problems = per_client_problems(cfg, client_ids)
    if problems:
        raise ConfigError(problems)
    return dict(zip(client_ids, cfg.adapter.ranks)) if cfg.adapter.ranks is not None else {}


def resolve_auto(
    cfg: ExperimentConfig, client_ids: list[str], model_dir: str
) -> tuple[ExperimentConfig, dict[str, Any]]:
    """`adapter.auto` resolved (`models.auto_rank`, no weights load): `cfg` with `adapter.ranks`
    and `client_codecs` set from each client's declared resources, and the round-0 facts (each
    client's rank, bits, memory estimate, upload size and why). Unchanged without `adapter.auto`.
    The picks depend on the config alone, so the server and every party compute the same ones:
    an 'auto' dtype or bf16 counts as fp32 (an upper bound on memory, whatever the device)."""
    from fedtune.config.schema import CodecConfig
    from fedtune.models.auto_rank import Workload, bits_codec, choose, model_shape

    auto = getattr(cfg.adapter, "auto", None)
    if auto is None:
        return cfg, {}
    problems = per_client_problems(cfg, client_ids)
    if problems:
        raise ConfigError(problems)
    if (cfg.codec.name != "identity" or cfg.client_codecs) and auto.bits != [32]:
        why = "adapter.auto picks each client's upload bits over the identity codec; codec / client_codecs are set"
        fix = "set adapter.auto.bits: [32], or drop codec and client_codecs"
        raise ConfigError([Problem("adapter.auto.bits", auto.bits, why, fix)])
    targets = lora_config(cfg.adapter, model_type(model_dir)).target_modules
    shape = model_shape(model_dir, "all-linear" if targets == "all-linear" else sorted(targets))
    dtype = "float32" if cfg.model.dtype == "auto" else cfg.model.dtype
    weight = cfg.model.quantize if cfg.model.quantize != "none" else dtype
    work = Workload(
        cfg.train.batch_size,
        cfg.data.block_size,
        weight,
        cfg.train.bf16 is True or dtype == "bfloat16",
        cfg.train.optimizer,
        cfg.model.gradient_checkpointing,
    )
    memory, budget = auto.per_client("per_client_memory_gb", client_ids), auto.per_client("budget_mb", client_ids)
    picks, infeasible = choose(shape, work, auto.ranks, auto.bits, memory, budget)
    if infeasible:
        raise ConfigError(
            [
                Problem(
                    f"adapter.auto.per_client_memory_gb / budget_mb [{cid}]",
                    f"{memory[cid]:g} GB / {budget.get(cid, '-')} MB",
                    f"no candidate fits: {why}",
                    "raise that client's resources, add smaller adapter.auto.ranks or bits, "
                    "or lower train.batch_size / data.block_size (or set model.gradient_checkpointing)",
                )
                for cid, why in sorted(infeasible.items())
            ]
        )
    codecs = {}
    for cid in client_ids:
        name, params = bits_codec(picks[cid].bits)
        if name != "identity":
            codecs[cid] = CodecConfig(name=name, **params)
    adapter = cfg.adapter.model_copy(update={"auto": None, "ranks": [picks[cid].rank for cid in client_ids]})
    resolved = cfg.model_copy(update={"adapter": adapter, "client_codecs": codecs or cfg.client_codecs})
    return resolved, {"adapter_auto": {cid: picks[cid].record() for cid in client_ids}}


def variants_per_client(cfg: ExperimentConfig, client_ids: list[str]) -> dict[str, int]:
    """Each client's adapter variant when the adapter has per-client options (a mixture's expert
    counts: {client: count}); {} when every client has the same adapter."""
    variants: dict[str, int] = build_adapter(cfg.adapter).client_variants(client_ids)
    if not variants:
        return {}
    problems = per_client_problems(cfg, client_ids)
    if problems:
        raise ConfigError(problems)
    return variants


def public_blocks(cfg: ExperimentConfig, tokenizer: Any) -> Callable[[str, int], torch.Tensor]:
    """n packed blocks of a public corpus, for an adapter's init (LoRA-SB's gradient estimate)."""

    def blocks(source: str, n: int) -> torch.Tensor:
        public = load_corpus(cfg.data.model_copy(update={"source": source, "labels": None}))
        return pack([str(t) for t in public["text"][: 4 * n]], tokenizer, cfg.data.block_size)[:n]

    return blocks


def build_adapted_model(
    cfg: ExperimentConfig,
    model_dir: str,
    client_ranks: dict[str, int],
    tokenizer: Any,
    shards: Mapping[str, Shard] | None = None,
) -> tuple[Any, Any]:
    """Load the base model once and add the adapter (seeded; an init from data reads `shards`,
    where this party has them, or a public corpus)."""
    model = load_model(model_dir, cfg.model)  # on the CPU: adapters are built there, then all moves
    r_max = max(client_ranks.values()) if client_ranks else None
    kind = model_type(model_dir)
    adapter_cfg = lora_config(cfg.adapter, kind, r=r_max)
    ctx = InjectContext(
        seed=derive_seed(cfg.seed, "adapter-init"),
        model_type=kind,
        r_max=r_max,
        train_lr=cfg.train.lr,
        shards=shards,
        public_blocks=public_blocks(cfg, tokenizer),
    )
    model = build_adapter(cfg.adapter).inject(model, ctx)
    device = resolve_device(cfg.model.device)
    for p in model.parameters():  # the adapter trains in fp32 whatever the base's dtype (master weights)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if p.requires_grad and getattr(model, "is_quantized", False):
            p.data = p.data.to(device)  # a quantized base was placed as it loaded and does not move
    return (model if getattr(model, "is_quantized", False) else model.to(device)), adapter_cfg


def run_precision(cfg: ExperimentConfig) -> tuple[ExperimentConfig, Precision, str | None]:
    """`cfg` with `model.dtype` and `train.bf16` resolved for this process's device ('auto':
    `models.precision`), the choice with its reason, and a warning (with the measured cost) when
    bf16 is set explicitly where the device only emulates it. Every engine's builder calls this
    before the model loads, so each party resolves 'auto' for its own device."""
    caps = strategy_capabilities(cfg)
    offsets = caps is not None and caps.base_offsets
    fp32_base = f"strategy {cfg.strategy.name!r} writes offsets into the base weights" if offsets else None
    device = resolve_device(cfg.model.device)
    p = choose_precision(cfg.model.dtype, cfg.train.bf16, device, fp32_base)
    resolved = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"dtype": p.dtype}),
            "train": cfg.train.model_copy(update={"bf16": p.bf16}),
        }
    )
    return resolved, p, precision_warning(p, device)


def device_facts(model: Any, precision: Precision | None = None, warning: str | None = None) -> dict[str, Any]:
    """Where a model runs, for the records: its device, the dtype of its frozen base weights (nf4 /
    int8 when bitsandbytes quantized it), the attention and fused kernels, and (given) whether bf16
    autocast is on, why, and the slow-bf16 warning; and its adapter: kind and trainable parameters
    (the equal-budget accounting)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    dtype = frozen[0].dtype if frozen else next(iter(model.parameters())).dtype
    out: dict[str, Any] = {"device": str(model_device(model)), "base_dtype": str(dtype).replace("torch.", "")}
    out.update(adapter=adapter_kind(model), trainable_parameters=trainable_parameter_count(model))
    kernel = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if kernel is not None:
        out["attention"] = str(kernel)
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None:  # bitsandbytes: 4-bit NF4 or 8-bit
        out["base_dtype"] = "nf4" if getattr(quant, "load_in_4bit", False) else "int8"
    out["kernels"] = "liger" if any(type(m).__name__.startswith("Liger") for m in model.modules()) else "transformers"
    if precision is not None:
        out.update(bf16_autocast=precision.bf16, precision=precision.reason)
    if warning is not None:
        out["precision_warning"] = warning
    return out


@dataclass
class Federation:
    """What the loop needs from where the clients live: their ids, the server's copy of the base
    model with the adapter (initial state, export), the strategy and the engine (built complete).

    Attributes:
        collected_bytes: raw training data the centralized baseline collects (uplink, round 1).
        round0: facts for the round-0 record (e.g. the simulated attackers).
        source_facts: what the data source left out before any client got a document (documents
            past data.max_docs_per_label): said on the console, not recorded, since only an engine
            that reads the corpus in this process knows it (the records of every engine stay equal).
        store: the clients' state store where it is in this process (in-process: the one the
            engine reads and writes; a decentralized run keeps each peer's model there), else None.
    """

    client_ids: list[str]
    model: Any
    model_dir: str
    adapter_cfg: Any
    strategy: StrategyCore
    engine: Engine
    collected_bytes: int = 0
    round0: dict[str, Any] = field(default_factory=dict)
    store: Any = None
    source_facts: dict[str, Any] = field(default_factory=dict)

"""Every registry in one place, and builders that turn typed config into plain keyword arguments
(components never see the config object)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import TypeAdapter

from fedtune.adapters import ADAPTERS, build_adapter
from fedtune.adapters.base import schedule_problems
from fedtune.client.train import TrainSpec
from fedtune.codecs import CODECS
from fedtune.codecs.build import build_codec as build_codec  # re-exported: the engines and loops build codecs here
from fedtune.codecs.build import local_codec as local_codec
from fedtune.config.schema import ExperimentConfig
from fedtune.data.sources import DATA_SOURCES
from fedtune.engines.capabilities import ENGINES, engine_problems
from fedtune.errors import Problem
from fedtune.models.export import folder_problems
from fedtune.models.gpu import kernels_problems, quantize_problems
from fedtune.models.load import device_problem, model_problem, resolve_device
from fedtune.registry import Registry
from fedtune.sampling import accounted_sampling_problems, round_problems
from fedtune.secagg import uplink_codec_problems
from fedtune.strategies import STRATEGIES
from fedtune.strategies.base import Capabilities, RunContext, StrategyCore, algebra_problems
from fedtune.strategies.decentralized import peer_codec_problems, peer_problems

REGISTRIES: dict[str, Registry[Any]] = {
    "strategy": STRATEGIES,
    "codec": CODECS,
    "data source": DATA_SOURCES,
    "adapter kind": ADAPTERS,
}


def strategy_class(cfg: ExperimentConfig) -> Any:
    return STRATEGIES.get(cfg.strategy.name) if cfg.strategy.name in STRATEGIES else None


def strategy_capabilities(cfg: ExperimentConfig) -> Capabilities | None:
    """The configured strategy's declared capabilities (None if the name or params are invalid)."""
    cls = strategy_class(cfg)
    if cls is None:
        return None
    try:
        return cls(**cfg.strategy.params()).capabilities  # type: ignore[no-any-return]
    except (TypeError, ValueError):
        return None  # reported by check_named


def check_strategy(cfg: ExperimentConfig) -> list[Problem]:
    """A strategy's declared needs against the config: its adapter, per-client ranks, secure
    aggregation, DP-SGD, and its own cross-field checks."""
    caps = strategy_capabilities(cfg)
    if caps is None:
        return []
    name = cfg.strategy.name
    problems = algebra_problems(f"strategy {name!r}", caps, cfg.adapter.kind)
    inner = cfg.strategy.params().get("inner")  # a wrapper (DP-FedAvg, FedOpt) runs its inner strategy's maths
    if isinstance(inner, str) and inner in STRATEGIES:
        problems += algebra_problems(
            f"inner strategy {inner!r}", STRATEGIES.get(inner)().capabilities, cfg.adapter.kind
        )
    refused = bool(problems)
    dp = cfg.strategy.name == "dp_fedavg" or cfg.train.dp_sgd is not None
    adapter = build_adapter(cfg.adapter)
    adapter_problems = adapter.problems(dp=dp, dp_sgd=cfg.train.dp_sgd is not None)
    if cfg.train.dp_sgd is not None:  # a group on its own schedule takes plain steps, outside DP-SGD
        adapter_problems += schedule_problems(adapter)
    problems += adapter_problems
    ranks_refused = any(p.field == "adapter.ranks" for p in adapter_problems)
    auto = getattr(cfg.adapter, "auto", None)
    if (cfg.adapter.ranks is not None or auto is not None) and not caps.heterogeneous_ranks and not ranks_refused:
        ok = [n for n in STRATEGIES.names() if STRATEGIES.get(n)().capabilities.heterogeneous_ranks]
        problems.append(
            Problem(
                "adapter.ranks" if auto is None else "adapter.auto",
                cfg.adapter.ranks if auto is None else "set",
                f"strategy {name!r} needs one rank for all clients",
                f"drop adapter.ranks or use one of: {', '.join(ok)}",
            )
        )
    if caps.accounts_sampling and cfg.sampling.availability.kind != "always":
        problems.append(
            Problem(
                "sampling.availability.kind",
                cfg.sampling.availability.kind,
                f"strategy {name!r} accounts privacy for a fixed client sampling rate, which an availability "
                "trace changes from round to round",
                "use kind: always with this strategy",
            )
        )
    if caps.accounts_sampling:
        problems += accounted_sampling_problems(cfg.sampling, name)
    if cfg.secure_aggregation:
        problems += uplink_codec_problems(cfg.codec.name)
    if cfg.secure_aggregation and not caps.sum_only:
        sums = sorted(n for n in STRATEGIES.names() if STRATEGIES.get(n)().capabilities.sum_only)
        problems.append(
            Problem(
                "secure_aggregation",
                True,
                f"strategy {name!r} needs the individual updates (it does not aggregate by a sum), "
                "but secure aggregation reveals only their sum",
                f"use one of {', '.join(sums)}, or set secure_aggregation: false",
            )
        )
    if cfg.train.dp_sgd is not None and caps.client_step:
        problems.append(
            Problem(
                "train.dp_sgd",
                cfg.train.dp_sgd.model_dump(),
                f"strategy {name!r} trains with its own client update, which DP-SGD does not cover",
                "use a first-order strategy (fedavg, fedit, ffa_lora, fedsb, ...) or drop train.dp_sgd",
            )
        )
    problems += sam_problems(name, caps, cfg.train.sam_rho, cfg.train.dp_sgd is not None)
    if dp and caps.raw_data:
        problems.append(
            Problem(
                "strategy.name",
                name,
                f"strategy {name!r} moves raw client data (tokens) outside the DP guarantee that is reported",
                "use another strategy (e.g. pcl with trust: weights, robust), or drop DP",
            )
        )
    if _stateful(cfg, downlink=True) and not caps.peer_to_peer:
        problems.append(
            Problem(
                "downlink_codec" if cfg.downlink_codec is not None else "codec",
                (cfg.downlink_codec or cfg.codec).name,
                "a stateful codec (error feedback, lazy uploads) on the downlink sends part of the model state; "
                "clients would train on a model with most of its entries missing",
                "set downlink_codec: {name: identity} (or fp16 / quantize) and keep the stateful codec for the uplink",
            )
        )
    down = cfg.downlink_codec if cfg.downlink_codec is not None else cfg.codec
    if caps.peer_to_peer:
        down_name = cfg.downlink_codec.name if cfg.downlink_codec is not None else None
        stateful = _stateful(cfg, False)
        codecs = peer_codec_problems(name, cfg.codec.name, stateful, down_name, sorted(cfg.client_codecs))
        problems += peer_problems(name, codecs, cfg.privacy.randomness)
    if cfg.sampling.link_drop > 0 and not caps.peer_to_peer:
        peers = sorted(n for n in STRATEGIES.names() if STRATEGIES.get(n)().capabilities.peer_to_peer)
        why = f"strategy {name!r} has a server: its messages are jobs and replies (use sampling.dropout)"
        problems.append(Problem("sampling.link_drop", cfg.sampling.link_drop, why, f"use one of: {', '.join(peers)}"))
    if caps.own_sampling:  # a silently ignored sampling section would misstate the run
        sampling = {
            "sampling.fraction": (cfg.sampling.fraction, 1.0),
            "sampling.min_clients": (cfg.sampling.min_clients, 1),
        }
        for key, (value, default) in sampling.items():
            if value != default:
                why = f"strategy {name!r} samples each round's peers itself (its own parameters)"
                problems.append(Problem(key, value, why, f"drop {key}; size the round with the strategy's parameters"))
    if caps.own_models:  # each party's own model: one tokenizer, a public corpus that is not the clients'
        problems += strategy_class(cfg).run_problems(cfg.model.name, cfg.data.source, cfg.strategy.params())
    if not refused:  # a strategy's own cross-field checks assume the adapter it declared
        problems += strategy_class(cfg).config_problems(
            cfg.strategy.params(), cfg.adapter, down, cfg.secure_aggregation
        )
    return problems


def check_task(cfg: ExperimentConfig) -> list[Problem]:
    """What the task (`task: embedding`) and train.ghost_noise need from the rest of the config."""
    from fedtune.embedding.checks import embedding_problems, ghost_noise_problems

    caps = strategy_capabilities(cfg)
    client_step = caps is not None and caps.client_step
    return embedding_problems(cfg) + ghost_noise_problems(cfg, client_step) + packing_problems(cfg, client_step)


def packing_problems(cfg: ExperimentConfig, client_step: bool) -> list[Problem]:
    """train.packing needs fedtune's own local step on a generative task, and an adapter whose
    forward keeps each token's position (`Adapter.packs`); the model type is checked with the
    model (`model_limit_problems`)."""
    if not cfg.train.packing:
        return []
    why = None
    if cfg.task != "generate":
        why = f"task {cfg.task!r} builds its own rows (GEM's summary tokens), which are not packed"
    elif client_step:
        why = f"strategy {cfg.strategy.name!r} trains with its own client update, which runs rows unpacked"
    elif cfg.adapter.kind in ADAPTERS and not build_adapter(cfg.adapter).packs:
        why = f"adapter.kind {cfg.adapter.kind!r} puts its virtual tokens before each row, not before each example"
    if why is None:
        return []
    return [Problem("train.packing", True, why, "set train.packing: false")]


def sam_problems(name: str, caps: Capabilities, rho: float, dp_sgd: bool) -> list[Problem]:
    """train.sam_rho against the method: a sharpness-aware method needs it, and a strategy with
    its own client update or DP-SGD's step would ignore it."""
    if caps.sharpness_aware and rho == 0:
        why = f"strategy {name!r} takes sharpness-aware (SAM) local steps, and train.sam_rho is 0 (plain steps)"
        return [Problem("train.sam_rho", rho, why, "set train.sam_rho, e.g. 0.05")]
    if rho > 0 and (caps.client_step or dp_sgd):
        who = "DP-SGD's per-example step" if dp_sgd else f"strategy {name!r}'s own client update"
        return [Problem("train.sam_rho", rho, f"{who} does not take SAM steps", "drop train.sam_rho")]
    return []


def model_limit_problems(cfg: ExperimentConfig, model_dir: str) -> list[Problem]:
    """The data must fit the model (data.block_size <= its maximum positions), and train.packing
    needs a model type whose packed mask is checked (`client.packing.PACKABLE_MODEL_TYPES`)."""
    from fedtune.client.packing import PACKABLE_MODEL_TYPES
    from fedtune.models.load import max_positions, model_type

    kind = model_type(model_dir)
    if cfg.train.packing and kind not in PACKABLE_MODEL_TYPES:
        return [
            Problem(
                "train.packing",
                True,
                f"model type {kind!r} ({model_dir}) is not one whose packed attention mask fedtune checks "
                f"({', '.join(sorted(PACKABLE_MODEL_TYPES))})",
                "set train.packing: false",
            )
        ]
    limit = max_positions(model_dir)
    if limit is not None and cfg.data.block_size > limit:
        return [
            Problem(
                "data.block_size",
                cfg.data.block_size,
                f"the model takes at most {limit} positions ({model_dir})",
                f"use data.block_size <= {limit}",
            )
        ]
    return []


def per_client_problems(cfg: ExperimentConfig, client_ids: list[str]) -> list[Problem]:
    """Checks that need the clients: adapter.ranks / adapter.experts lists (one entry per
    client), train.client_lr's client ids and the strategy on the configured sample size (Krum's n >= 2f + 3, ...)."""
    out = []
    n, ids = len(client_ids), ", ".join(client_ids)
    out += folder_problems(client_ids)
    if cfg.adapter.ranks is not None and len(cfg.adapter.ranks) != n:
        out.append(
            Problem(
                "adapter.ranks",
                cfg.adapter.ranks,
                f"one rank per client is needed; there are {n} clients ({ids})",
                f"give {n} ranks",
            )
        )
    unknown = sorted(set(cfg.train.client_lr or {}) - set(client_ids))
    if unknown:
        out.append(
            Problem("train.client_lr", cfg.train.client_lr, f"no client {', '.join(unknown)}", f"use client ids: {ids}")
        )
    named = {"client_codecs": sorted(cfg.client_codecs)}
    auto = getattr(cfg.adapter, "auto", None)
    for key in ("per_client_memory_gb", "budget_mb") if auto is not None else ():
        value = getattr(auto, key)
        if isinstance(value, dict):
            named[f"adapter.auto.{key}"] = sorted(value)
            missing = sorted(set(client_ids) - set(value))
            if missing:
                out.append(
                    Problem(
                        f"adapter.auto.{key}",
                        value,
                        f"no value for {', '.join(missing)}",
                        f"give one per client: {ids}",
                    )
                )
    for key, given in named.items():
        unknown = sorted(set(given) - set(client_ids))
        if unknown:
            out.append(Problem(key, given, f"no client {', '.join(unknown)}", f"use client ids: {ids}"))
    out += build_adapter(cfg.adapter).client_problems(client_ids)
    cls = strategy_class(cfg)
    if cls is not None and n > 0:
        from fedtune.sampling import sample_size

        k = sample_size(n, cfg.sampling.fraction, cfg.sampling.min_clients)
        built = TypeAdapter(cls).validate_python(cfg.strategy.params())
        out += built.sample_problems(k) + built.network_problems(client_ids, cfg.seed)
        out += round_problems(cfg.sampling, n, k, cfg.secure_aggregation)
    return out


def check_data_source(cfg: ExperimentConfig) -> list[Problem]:
    from pathlib import Path

    if cfg.data.source == "files":
        if not cfg.data.path:
            return [Problem("data.path", None, "source 'files' needs a path", "set data.path to a file or folder")]
        if not Path(cfg.data.path).expanduser().exists():
            return [Problem("data.path", cfg.data.path, "does not exist", "give an existing file or folder")]
    return []


def check_model(cfg: ExperimentConfig) -> list[Problem]:
    out = []
    why = model_problem(cfg.model)
    if why is not None:
        out.append(Problem("model.name", cfg.model.name, why, "use 'smollm2', 'tiny' or a local HF model dir"))
    why = device_problem(cfg.model.device)
    if why is not None:
        out.append(Problem("model.device", cfg.model.device, why, "use 'auto' or 'cpu'"))
    if cfg.model.dtype == "bfloat16" and not cfg.train.bf16:
        out.append(
            Problem(
                "model.dtype",
                cfg.model.dtype,
                "a bf16 base with fp32 adapters runs under bf16 autocast",
                "set train.bf16: true, or model.dtype: float32",
            )
        )
    caps = strategy_capabilities(cfg)
    device = "cuda" if why is None and resolve_device(cfg.model.device).type == "cuda" else "cpu"
    offsets = None
    if caps is not None and caps.base_offsets:
        offsets = f"strategy {cfg.strategy.name!r} writes offsets into the base weights"
    out += quantize_problems(cfg.model.quantize, device, offsets) + kernels_problems(cfg.model.kernels, device)
    if cfg.model.dtype == "bfloat16" and caps is not None and caps.base_offsets:
        out.append(
            Problem(
                "model.dtype",
                cfg.model.dtype,
                f"strategy {cfg.strategy.name!r} writes offsets into the base weights, and bf16 keeps "
                "only 8 bits of mantissa: small offsets would round away",
                "use model.dtype: float32 (train.bf16 autocast still speeds up the matmuls)",
            )
        )
    return out


def _stateful(cfg: ExperimentConfig, downlink: bool) -> bool:
    """Whether the (up- or down-) link codec keeps state; False for an invalid codec (reported by check_codec)."""
    try:
        return bool(build_codec(cfg, downlink=downlink).stateful)
    except (KeyError, TypeError, ValueError):
        return False


def check_engine(cfg: ExperimentConfig, engine: str | None = None) -> list[Problem]:
    """What the chosen engine (default: engine.name) cannot do for this config."""
    name = engine or cfg.engine.name
    caps = strategy_capabilities(cfg)
    if caps is None:
        return []
    stateful = _stateful(cfg, downlink=False) or _stateful(cfg, downlink=True)
    return engine_problems(ENGINES[name], cfg, caps, stateful)


def build_strategy(cfg: ExperimentConfig, ctx: RunContext) -> StrategyCore:
    """Instantiate the configured strategy with its run context, from the validated (type-coerced)
    parameters, never the raw strings of a YAML file or `--set`."""
    cls = STRATEGIES.get(cfg.strategy.name)
    params = TypeAdapter(cls).validate_python(cfg.strategy.params()) if cfg.strategy.params() else cls()
    return dataclasses.replace(params, ctx=ctx)  # type: ignore[no-any-return]  # the registry's classes


def run_context(cfg: ExperimentConfig, client_ids: list[str], lora_scale: float, hidden_size: int = 0) -> RunContext:
    """The run facts a strategy may use, including the real sampling rate and scheme (and the
    model's hidden width, where the engine has the model)."""
    from fedtune.sampling import sample_size

    n = len(client_ids)
    k = sample_size(n, cfg.sampling.fraction, cfg.sampling.min_clients)
    q = cfg.sampling.fraction if cfg.sampling.scheme == "poisson" else k / n
    ranks = dict(zip(client_ids, cfg.adapter.ranks)) if cfg.adapter.ranks is not None else {}
    return RunContext(
        seed=cfg.seed,
        lora_scale=lora_scale,
        client_ranks=ranks,
        train_lr=cfg.train.lr,
        sampling_rate=q,
        sampling_scheme=cfg.sampling.scheme,
        num_clients=n,
        sample_size=k,
        client_ids=tuple(client_ids),
        randomness=cfg.randomness(),
        hidden_size=hidden_size,
    )


def build_train_spec(cfg: ExperimentConfig) -> TrainSpec:
    fields = cfg.train.model_dump(exclude={"dp_sgd", "client_lr", "ghost_noise"})
    if cfg.train.ghost_noise is not None:
        gni = cfg.train.ghost_noise
        fields.update(ghost_batch=gni.batch_size, ghost_eps=gni.eps, ghost_last=gni.last)
    if cfg.train.dp_sgd is not None:
        fields.update(
            dp_clip=cfg.train.dp_sgd.clip, dp_noise=cfg.train.dp_sgd.noise_multiplier, dp_randomness=cfg.randomness()
        )
    return TrainSpec(**fields)

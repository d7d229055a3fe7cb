"""Every registry in one place, and builders that turn typed config into plain keyword arguments
(components never see the config object)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedtune.client.train import TrainSpec
from fedtune.codecs import CODECS
from fedtune.config.schema import ExperimentConfig
from fedtune.data.sources import DATA_SOURCES
from fedtune.errors import Problem
from fedtune.models.load import model_problem
from fedtune.registry import Registry
from fedtune.strategies import STRATEGIES

# Strategy fields fedtune fills in from the run (not user parameters).
CONTEXT_FIELDS = ("lora_scale", "seed", "client_ranks", "train_lr", "sampling_rate")

REGISTRIES: dict[str, Registry[Any]] = {
    "strategy": STRATEGIES,
    "codec": CODECS,
    "data source": DATA_SOURCES,
}


def check_named(field: str, registry: Registry[type], name: str, params: dict[str, Any]) -> list[Problem]:
    """Problems with a component name and its keyword parameters (unknown keys, wrong types)."""
    if name not in registry:
        return [
            Problem(f"{field}.name", name, f"unknown {registry.kind}", f"use one of: {', '.join(registry.names())}")
        ]
    cls = registry.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    problems = []
    for key in params:
        if key in CONTEXT_FIELDS:
            problems.append(
                Problem(
                    f"{field}.{key}",
                    params[key],
                    "set by fedtune from the run",
                    "remove it (use adapter.alpha / adapter.ranks / seed)",
                )
            )
        elif key not in fields:
            valid = ", ".join(sorted(set(fields) - set(CONTEXT_FIELDS))) or "(none)"
            problems.append(
                Problem(
                    f"{field}.{key}",
                    params[key],
                    f"unknown parameter of {registry.kind} {name!r}",
                    f"valid parameters: {valid}",
                )
            )
    known = {k: v for k, v in params.items() if k in fields}
    if known:
        try:
            TypeAdapter(cls).validate_python(known)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                problems.append(
                    Problem(
                        f"{field}.{loc}", err.get("input"), err["msg"], "see `fedtune ls` for the parameter's meaning"
                    )
                )
        except (TypeError, ValueError) as e:
            problems.append(Problem(field, known, str(e), "fix the parameters"))
    return problems


def check_adapter_kind(cfg: ExperimentConfig) -> list[Problem]:
    """A strategy that needs a particular adapter (Fed-SB needs LoRA-SB) says so."""
    if cfg.strategy.name not in STRATEGIES:
        return []
    need = getattr(STRATEGIES.get(cfg.strategy.name), "adapter_kind", None)
    if need is not None and cfg.adapter.kind != need:
        return [
            Problem(
                "adapter.kind",
                cfg.adapter.kind,
                f"strategy {cfg.strategy.name!r} needs adapter.kind {need!r}",
                f"set adapter.kind: {need}",
            )
        ]
    if cfg.adapter.kind == "lora_sb" and cfg.adapter.ranks is not None:
        return [
            Problem(
                "adapter.ranks", cfg.adapter.ranks, "LoRA-SB shares A and B: one rank for all", "drop adapter.ranks"
            )
        ]
    return []


def check_strategy_fit(cfg: ExperimentConfig) -> list[Problem]:
    """A strategy's own cross-field checks (`config_problems(params, adapter)`), e.g. CoMiGS's
    generalists against the clients' expert counts."""
    if cfg.strategy.name not in STRATEGIES:
        return []
    check = getattr(STRATEGIES.get(cfg.strategy.name), "config_problems", None)
    if check is None:
        return []
    import inspect

    if "codec" in inspect.signature(check).parameters:
        down = cfg.downlink_codec if cfg.downlink_codec is not None else cfg.codec
        return check(cfg.strategy.params(), cfg.adapter, codec=down)
    return check(cfg.strategy.params(), cfg.adapter)


def check_secure_aggregation(cfg: ExperimentConfig) -> list[Problem]:
    if not cfg.secure_aggregation or cfg.strategy.name not in STRATEGIES:
        return []
    if not getattr(STRATEGIES.get(cfg.strategy.name), "sum_aggregate", False):
        sums = sorted(n for n in STRATEGIES.names() if getattr(STRATEGIES.get(n), "sum_aggregate", False))
        return [
            Problem(
                "secure_aggregation",
                True,
                f"strategy {cfg.strategy.name!r} needs the individual updates (it does not aggregate by a sum), "
                "but secure aggregation reveals only their sum",
                f"use one of {', '.join(sums)}, or set secure_aggregation: false",
            )
        ]
    check = getattr(STRATEGIES.get(cfg.strategy.name), "secure_problems", None)
    return check(cfg.strategy.params()) if check is not None else []


def check_dp_sgd(cfg: ExperimentConfig) -> list[Problem]:
    """Sample-level DP-SGD replaces the first-order local loop; strategies that train their own
    way (zeroth-order, projected) and CoMiGS's router steps on the validation split are not covered."""
    if cfg.train.dp_sgd is None:
        return []
    own = cfg.strategy.name in STRATEGIES and hasattr(STRATEGIES.get(cfg.strategy.name), "client_train")
    if own:
        return [
            Problem(
                "train.dp_sgd",
                cfg.train.dp_sgd.model_dump(),
                f"strategy {cfg.strategy.name!r} trains with its own client update, which DP-SGD does not cover",
                "use a first-order strategy (fedavg, fedit, ffa_lora, fedsb, ...) or drop train.dp_sgd",
            )
        ]
    if cfg.adapter.kind == "moe_lora" and cfg.adapter.router != "frozen" and cfg.adapter.router_every > 0:
        return [
            Problem(
                "adapter.router_every",
                cfg.adapter.router_every,
                "the alternating router steps read the validation split outside DP-SGD's accounting",
                "set adapter.router_every: 0 (routers train inside DP-SGD) or drop train.dp_sgd",
            )
        ]
    return []


def check_ranks(cfg: ExperimentConfig) -> list[Problem]:
    if cfg.adapter.ranks is None or cfg.strategy.name not in STRATEGIES:
        return []
    if getattr(STRATEGIES.get(cfg.strategy.name), "heterogeneous_ranks", False):
        return []
    ok = [n for n in STRATEGIES.names() if getattr(STRATEGIES.get(n), "heterogeneous_ranks", False)]
    return [
        Problem(
            "adapter.ranks",
            cfg.adapter.ranks,
            f"strategy {cfg.strategy.name!r} needs one rank for all clients",
            f"drop adapter.ranks or use one of: {', '.join(ok)}",
        )
    ]


def check_data_source(cfg: ExperimentConfig) -> list[Problem]:
    from pathlib import Path

    if cfg.data.source == "files":
        if not cfg.data.path:
            return [Problem("data.path", None, "source 'files' needs a path", "set data.path to a file or folder")]
        if not Path(cfg.data.path).expanduser().exists():
            return [Problem("data.path", cfg.data.path, "does not exist", "give an existing file or folder")]
    return []


def check_model(cfg: ExperimentConfig) -> list[Problem]:
    why = model_problem(cfg.model)
    if why is None:
        return []
    return [Problem("model.name", cfg.model.name, why, "use 'smollm2', 'tiny' or a local HF model dir")]


def build_strategy(cfg: ExperimentConfig, **context: Any) -> Any:
    """Instantiate the configured strategy; context (lora_scale, seed, client_ranks) is passed to
    the strategies that declare those fields."""
    cls = STRATEGIES.get(cfg.strategy.name)
    context.setdefault("train_lr", cfg.train.lr)
    context.setdefault("sampling_rate", cfg.sampling.fraction)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    extra = {k: v for k, v in context.items() if k in fields and k in CONTEXT_FIELDS}
    return cls(**cfg.strategy.params(), **extra)


def codec_stages(codec: Any) -> list[tuple[str, dict[str, Any]]]:
    """(stage name, params) of a codec config: `name: chain` with `stages: [...]`, or one stage."""
    if codec.name != "chain":
        return [(codec.name, codec.params())]
    return [(str(s.get("name")), {k: v for k, v in s.items() if k != "name"}) for s in codec.params()["stages"]]


def check_codec(field: str, codec: Any) -> list[Problem]:
    """Problems with a codec config: each stage's name and parameters."""
    if codec.name != "chain":
        return check_named(field, CODECS, codec.name, codec.params())
    params = codec.params()
    stages = params.get("stages")
    extra = sorted(set(params) - {"stages"})
    problems = [
        Problem(f"{field}.{k}", params[k], "unknown parameter of a codec chain", "use only stages") for k in extra
    ]
    if not isinstance(stages, list) or not stages or not all(isinstance(x, dict) and "name" in x for x in stages):
        return [
            *problems,
            Problem(
                f"{field}.stages",
                stages,
                "a chain needs a non-empty list of stages, each with a name",
                "e.g. stages: [{name: topk, fraction: 0.01}, {name: quantize, bits: 8}]",
            ),
        ]
    for i, (name, p) in enumerate(codec_stages(codec)):
        problems += check_named(f"{field}.stages[{i}]", CODECS, name, p)
    return problems


def build_codec(cfg: ExperimentConfig, downlink: bool = False) -> Any:
    """The uplink codec (`codec`), or the downlink one (`downlink_codec`, default: `codec`)."""
    from fedtune.codecs import Chain

    codec = cfg.downlink_codec if downlink and cfg.downlink_codec is not None else cfg.codec
    return Chain(tuple(CODECS.get(name)(**params) for name, params in codec_stages(codec)))


def build_train_spec(cfg: ExperimentConfig) -> TrainSpec:
    fields = cfg.train.model_dump(exclude={"dp_sgd"})
    if cfg.train.dp_sgd is not None:
        fields.update(dp_clip=cfg.train.dp_sgd.clip, dp_noise=cfg.train.dp_sgd.noise_multiplier)
    spec = TrainSpec(**fields)
    if cfg.adapter.kind != "moe_lora":
        return spec
    from dataclasses import replace

    a = cfg.adapter
    return replace(
        spec,
        lb_weight=a.lb_weight,
        router_every=a.router_every if a.router != "frozen" else 0,
        router_steps=a.router_steps,
        router_lr=a.router_lr if a.router_lr is not None else cfg.train.lr,
    )

"""What `task: embedding` supports, declared as data and checked at validate time (every problem
at once, each naming the field, its value and the fix)."""

from __future__ import annotations

from typing import Any

from fedtune.config.schema import ExperimentConfig
from fedtune.errors import Problem

# field -> the values the embedding loop runs (it aggregates any adapter state key by key, so any
# strategy that does FedAvg-style sums works; these are the ones it is tested with)
EMBEDDING_SUPPORTS: dict[str, tuple[Any, ...]] = {
    "strategy.name": ("fedavg", "local"),
    "adapter.kind": ("lora",),
    "engine.name": ("inprocess",),
    "codec.name": ("identity",),
    "data.source": ("chatterbot", "stdlib-docstrings", "20newsgroups", "files"),
    "attack.kind": ("none",),
}
# fields the embedding loop does not implement: they must stay at these (default) values
EMBEDDING_OFF: dict[str, Any] = {
    "train.dp_sgd": None,
    "train.prox_mu": 0.0,
    "train.sam_rho": 0.0,
    "client_codecs": {},
    "adapter.auto": None,
    "sampling.link_drop": 0.0,
    "train.client_lr": None,
    "adapter.ranks": None,
    "evaluation.ood": False,
    "evaluation.val": False,
    "evaluation.clients": None,
    "sampling.min_updates": 1,
    "sampling.deadline": None,
    "downlink_codec": None,
    "audit": None,
    "secure_aggregation": False,
    "budget_mb": None,
    "sampling.dropout": 0.0,
    "sampling.straggler_fraction": 0.0,
}


def _get(cfg: Any, dotted: str) -> Any:
    """The value at a dotted key (None where this config has no such field, e.g. another adapter kind's)."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def embedding_problems(cfg: ExperimentConfig) -> list[Problem]:
    """Problems of a `task: embedding` config ([] for other tasks)."""
    if cfg.task != "embedding":
        return []
    out = []
    for field, allowed in EMBEDDING_SUPPORTS.items():
        value = _get(cfg, field)
        if value not in allowed:
            out.append(Problem(field, value, "not supported with task: embedding", f"use one of: {', '.join(allowed)}"))
    for field, default in EMBEDDING_OFF.items():
        value = _get(cfg, field)
        if value != default:
            out.append(
                Problem(field, value, "not implemented for task: embedding", f"remove it (default: {default!r})")
            )
    if cfg.data.source == "files" and cfg.data.format == "text":
        out.append(
            Problem(
                "data.format",
                cfg.data.format,
                "task: embedding needs (query, document) pairs",
                "use data.format prompt_completion, messages or alpaca (prompt = query, completion = document)",
            )
        )
    k = cfg.embedding.num_tokens
    if cfg.data.block_size < k + 2:
        out.append(
            Problem(
                "data.block_size",
                cfg.data.block_size,
                f"a text of at least 2 tokens plus {k} GEM token(s) does not fit",
                f"use data.block_size >= {k + 2}",
            )
        )
    return out


def ghost_noise_problems(cfg: ExperimentConfig, client_step: bool) -> list[Problem]:
    """train.ghost_noise acts in fedtune's own local step; a strategy with its own client update
    (`client_step`: zeroth-order FedKSeed, Ferret) never runs it."""
    if cfg.train.ghost_noise is None or not client_step:
        return []
    return [
        Problem(
            "train.ghost_noise",
            cfg.train.ghost_noise.model_dump(),
            f"strategy {cfg.strategy.name!r} trains with its own client update, which does not inject ghost noise",
            "use a first-order strategy (fedavg, fedprox, ...) or drop train.ghost_noise",
        )
    ]

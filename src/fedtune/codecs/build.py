"""Codecs from the config: a codec section's stages, its problems, and the built chain."""

from __future__ import annotations

from typing import Any

from fedtune.codecs.base import CODECS, Codec
from fedtune.config.schema import ExperimentConfig
from fedtune.errors import Problem
from fedtune.registry import check_named


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


def build_codec(cfg: ExperimentConfig, downlink: bool = False, client: str | None = None) -> Codec:
    """The uplink codec (`codec`; a client's own from `client_codecs` when given), or the
    downlink one (`downlink_codec`, default: `codec`)."""
    from fedtune.codecs import Chain

    codec = cfg.downlink_codec if downlink and cfg.downlink_codec is not None else cfg.codec
    if not downlink and client is not None:
        codec = cfg.client_codecs.get(client, codec)
    return Chain(tuple(CODECS.get(name)(**params) for name, params in codec_stages(codec)))


def local_codec() -> Codec:
    """The identity codec of a hand-off inside one party (a peer's own model to its own client
    step and its delta back): not a message, so never compressed nor counted."""
    from fedtune.codecs import make_codec

    return make_codec("identity")

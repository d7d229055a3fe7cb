"""The search space of `fedtune tune`: a YAML file mapping dotted config keys to ranges,
checked against the experiment schema (every problem at once) before any trial trains.

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # floats (log-uniform)
    train.steps: {low: 4, high: 16, step: 4}           # integers (low, high and step all integers)
    adapter.r: {choices: [4, 8, 16]}                   # one of these values
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedtune.errors import ConfigError, Problem


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class Choices:
    values: tuple[None | bool | int | float | str, ...]


Dimension = FloatRange | IntRange | Choices
SearchSpace = dict[str, Dimension]

# set by `fedtune tune` for every trial: the trial's folder, and the validation split it is scored on
RESERVED = {
    "name": "the study names its trials",
    "output_dir": "each trial runs in its own folder of the study",
    "evaluation.val": "trials are always scored on the clients' validation splits",
}
EXAMPLES = "{low: 1.0e-4, high: 1.0e-2, log: true}, {low: 4, high: 16, step: 4} or {choices: [4, 8, 16]}"
RANGE_KEYS = ("low", "high", "log", "step", "choices")


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def parse_dimension(field: str, spec: object) -> tuple[Dimension | None, list[Problem]]:
    """One entry of the space file -> a Dimension, or the problems that stop it being one."""
    if not isinstance(spec, Mapping):
        return None, [Problem(field, spec, "a search range must be a mapping", f"write e.g. {EXAMPLES}")]
    unknown = sorted(str(k) for k in spec if k not in RANGE_KEYS)
    if unknown:
        return None, [Problem(field, dict(spec), f"unknown range key(s) {', '.join(unknown)}", f"use {EXAMPLES}")]
    if "choices" in spec:
        return _choices(field, spec)
    return _range(field, spec)


def _choices(field: str, spec: Mapping[str, Any]) -> tuple[Dimension | None, list[Problem]]:
    values = spec["choices"]
    if len(spec) > 1:
        others = sorted(k for k in spec if k != "choices")
        return None, [Problem(field, dict(spec), f"choices cannot be combined with {', '.join(others)}", "keep one")]
    if not isinstance(values, list) or not values:
        return None, [Problem(field, values, "choices must be a non-empty list", "write e.g. {choices: [4, 8, 16]}")]
    bad = [v for v in values if v is not None and not isinstance(v, bool | int | float | str)]
    if bad:
        fix = "search over scalar settings (numbers, strings, true/false); a list-valued key is tuned as a whole string"
        return None, [Problem(field, bad[0], "each choice must be a single number, string, boolean or null", fix)]
    if len({repr(v) for v in values}) != len(values):
        return None, [Problem(field, values, "choices repeat a value", "list each value once")]
    return Choices(tuple(values)), []


def _range(field: str, spec: Mapping[str, Any]) -> tuple[Dimension | None, list[Problem]]:
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        return None, [Problem(field, dict(spec), f"missing {' and '.join(missing)}", f"write e.g. {EXAMPLES}")]
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    problems = [
        Problem(field, spec[k], f"{k} must be a finite number", f"write e.g. {k}: 1.0e-3")
        for k in ("low", "high", "step")
        if k in spec and not _number(spec[k])
    ]
    if not isinstance(log, bool):
        problems.append(Problem(field, log, "log must be true or false", "write log: true for a log-uniform range"))
    if problems:
        return None, problems
    if low >= high:
        return None, [Problem(field, dict(spec), "low must be below high", f"e.g. low: {high}, high: {low}")]
    if log and step is not None:
        return None, [Problem(field, dict(spec), "log and step cannot be combined", "remove one of them")]
    if log and low <= 0:
        return None, [Problem(field, low, "a log range needs low > 0", "choose a positive low, e.g. 1.0e-5")]
    if step is not None and step <= 0:
        return None, [Problem(field, step, "step must be positive", "e.g. step: 4")]
    if all(isinstance(v, int) for v in (low, high, step if step is not None else 1)):
        if (high - low) % (step or 1):
            fix = f"high: {low + (high - low) // step * step} (or another low + k * step)"
            return None, [Problem(field, dict(spec), "high - low must be a multiple of step", fix)]
        return IntRange(low, high, step or 1, log), []
    return FloatRange(float(low), float(high), log, None if step is None else float(step)), []


def probes(dim: Dimension) -> list[Any]:
    """Values the schema must accept for the whole range to be usable: the ends, and for a float
    range an inner value (so an integer setting given a float range is refused before training)."""
    if isinstance(dim, Choices):
        return list(dim.values)
    if isinstance(dim, IntRange):
        return [dim.low, dim.high]
    inner = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
    return [dim.low, dim.high] if dim.step is not None else [dim.low, dim.high, inner]


def read_space(path: Path) -> dict[str, Any]:
    where = str(path)
    if not path.is_file():
        raise ConfigError([Problem("--space", where, "file not found", "pass a YAML file of search ranges")])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([Problem(where, None, f"invalid YAML: {e}", "fix the YAML syntax there")]) from None
    if not isinstance(raw, dict) or not raw:
        fix = f"write one line per key, e.g. `train.lr: {EXAMPLES.split(', ')[0]}`"
        raise ConfigError([Problem(where, raw, "a space file maps dotted config keys to ranges", fix)])
    return raw


def load_space(path: Path, base: dict[str, Any]) -> SearchSpace:
    """Parse the space file at `path` and check every range against the schema applied to the
    experiment `base` (its raw YAML mapping); raise ConfigError naming the file, key and value."""
    from fedtune.config.load import config_from_dict, with_values

    space: SearchSpace = {}
    problems: list[Problem] = []
    for key, spec in read_space(path).items():
        field = f"{path}: {key}"
        if str(key) in RESERVED:
            problems.append(Problem(field, spec, f"cannot be searched ({RESERVED[str(key)]})", "remove this key"))
            continue
        dim, found = parse_dimension(field, spec)
        problems += found
        if dim is None:
            continue
        space[str(key)] = dim
        for value in probes(dim):
            try:
                config_from_dict(with_values(base, {str(key): value}))
            except ConfigError as e:  # the first refused value says what the range gets wrong
                why = "; ".join(f"{p.field}: {p.constraint}" for p in e.problems)
                fixes = "; ".join(dict.fromkeys(p.fix for p in e.problems))
                if isinstance(dim, FloatRange) and "valid integer" in why:
                    fixes = f"an integer setting: write integers, e.g. low: {int(dim.low)}, high: {int(dim.high)}"
                problems.append(Problem(field, value, f"the experiment config rejects it ({why})", fixes))
                break
    if problems:
        raise ConfigError(problems)
    return space

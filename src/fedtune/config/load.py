"""Load an experiment from YAML, apply key=value overrides, and report every problem at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fedtune.config.schema import ADAPTER_CONFIGS, ExperimentConfig
from fedtune.errors import ConfigError, Problem


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3); the value is parsed as YAML (numbers, lists, true/false)."""
    if "=" not in item:
        raise ConfigError([Problem("--set", item, "expected key=value", "write e.g. --set rounds=5")])
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-6 as a string; a number is meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        _set_(out, path, value)
    return out


def with_values(raw: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` with dotted keys set to already-parsed values, as `--set key=value` sets them."""
    out = _deepcopy(raw)
    for key, value in values.items():
        _set_(out, key.split("."), value)
    return out


def _set_(node: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types
    """YAML's safe loader, refusing a key given twice in one mapping (safe_load keeps the last one
    silently: a second `train:` section replaced the whole first one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                    "YAML would keep only the second",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return dict(super().construct_mapping(node, deep=deep))


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([Problem("config", str(p), "file not found", "pass a YAML file, e.g. configs/demo.yaml")])
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            [Problem("config", str(p), f"invalid YAML at {where}: {problem}", "fix the YAML syntax there")]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError([Problem("config", str(p), "top level must be a mapping", "write key: value pairs")])
    return raw


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at a location of the schema (for 'unknown key' messages)."""
    cls: type[BaseModel] | None = model
    for part in loc[:-1]:
        if cls is None:
            return []
        field = cls.model_fields.get(str(part))
        ann = field.annotation if field else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(cls.model_fields) if cls is not None else []


def _untagged(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], str | None]:
    """An error location without the adapter kind pydantic puts after 'adapter' (the union's
    tag), and that kind (None elsewhere)."""
    if len(loc) >= 3 and loc[0] == "adapter" and loc[1] in ADAPTER_CONFIGS:
        return (loc[0], *loc[2:]), str(loc[1])
    return loc, None


def _adapter_key_problem(field: str, value: Any, kind: str) -> Problem:
    """An adapter option the chosen kind does not have: name the kinds that have it."""
    key = field.split(".", 1)[1]
    owners = [k for k, model in ADAPTER_CONFIGS.items() if key in model.model_fields]
    if owners:
        return Problem(
            field,
            value,
            f"not an option of adapter.kind {kind!r} (an option of: {', '.join(owners)})",
            f"set adapter.kind: {owners[0]}, or remove {field}",
        )
    valid = sorted(ADAPTER_CONFIGS[kind].model_fields)
    return Problem(field, value, f"unknown key of adapter.kind {kind!r}", f"use one of: {', '.join(valid)}")


def problems_from_validation(err: ValidationError, raw: dict[str, Any]) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc, kind = _untagged(tuple(e["loc"]))
        field = ".".join(str(x) for x in loc) or "config"
        value = e.get("input")
        if e["type"] == "extra_forbidden" and kind is not None:
            problems.append(_adapter_key_problem(field, value, kind))
            continue
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(ExperimentConfig, loc)
            problems.append(Problem(field, value, "unknown key", f"use one of: {', '.join(valid)}"))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            fix = f"use one of {ctx['expected']}"
        elif "expected_tags" in ctx:
            fix = f"use one of {ctx['expected_tags']}"
        elif e["type"] in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
            fix = f"choose a value that is {msg.lower().removeprefix('input should be ')}"
        elif e["type"] == "missing":
            fix = "add this key"
        else:
            fix = "see `fedtune validate --help` and configs/ for examples"
        if isinstance(value, dict) and e["type"] == "value_error":
            value = {k: v for k, v in value.items() if not isinstance(v, dict)}
        problems.append(Problem(field, value, msg, fix))
    return problems


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment; raise ConfigError listing every problem."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    booleans = boolean_problems(ExperimentConfig, raw)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:  # and the names that need no valid config: every problem at once
        found = problems_from_validation(err, raw)
        known = {p.field for p in found}
        more = [p for p in [*booleans, *name_problems(raw)] if p.field not in known]
        raise ConfigError(found + more) from None
    if booleans:
        raise ConfigError(booleans)
    problems = check_components(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def boolean_problems(model: type[BaseModel], raw: Any, prefix: str = "") -> list[Problem]:
    """`rounds: true` or `train.lr: true` where a number belongs (pydantic's lax mode reads a
    boolean as 1 or 1.0, silently), found by walking the raw YAML along the schema's sections."""
    if not isinstance(raw, dict):
        return []
    out = []
    for name, info in model.model_fields.items():
        if name not in raw:
            continue
        value, field = raw[name], f"{prefix}{name}"
        if isinstance(value, bool) and _numeric(info.annotation):
            out.append(Problem(field, value, "a boolean where a number belongs", f"give {field} a number"))
        elif isinstance(value, dict):
            if name == "adapter" and model is ExperimentConfig:  # a union chosen by `kind`
                section: Any = ADAPTER_CONFIGS.get(str(value.get("kind", "lora")))
            else:
                section = next((a for a in (info.annotation, *get_args(info.annotation)) if _is_model(a)), None)
            if section is not None:
                out += boolean_problems(section, value, f"{field}.")
    return out


def _numeric(annotation: Any) -> bool:
    """int or float, or an optional one (not bool, not a union with other types)."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) else [annotation]
    return bool(args) and all(a in (int, float) for a in args)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def name_problems(raw: dict[str, Any]) -> list[Problem]:
    """Unknown component names, read from the raw YAML (so they are reported with a schema
    problem elsewhere, which stops the full checks of `check_components`)."""
    from fedtune import components  # registers everything
    from fedtune.registry import check_named

    out: list[Problem] = []
    for field, kind in (("strategy", "strategy"), ("codec", "codec"), ("downlink_codec", "codec")):
        section = raw.get(field)
        name = section.get("name") if isinstance(section, dict) else None
        if isinstance(name, str) and name != "chain" and name not in components.REGISTRIES[kind]:
            out += check_named(field, components.REGISTRIES[kind], name, {})
    data = raw.get("data")
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, str) and source not in components.REGISTRIES["data source"]:
        names = ", ".join(components.REGISTRIES["data source"].names())
        out.append(Problem("data.source", source, "unknown data source", f"use one of: {names}"))
    return out


def check_components(cfg: ExperimentConfig) -> list[Problem]:
    """Checks that need the registries (names and each component's own parameters)."""
    from fedtune import components  # registers everything
    from fedtune.codecs.build import check_codec
    from fedtune.registry import check_named

    problems: list[Problem] = []
    problems += check_named("strategy", components.REGISTRIES["strategy"], cfg.strategy.name, cfg.strategy.params())
    problems += check_codec("codec", cfg.codec)
    if cfg.downlink_codec is not None:
        problems += check_codec("downlink_codec", cfg.downlink_codec)
    for cid, codec in sorted(cfg.client_codecs.items()):
        problems += check_codec(f"client_codecs.{cid}", codec)
    if cfg.secure_aggregation and (cfg.client_codecs or getattr(cfg.adapter, "auto", None)):
        why = "masked uploads cancel only when every client encodes alike (and adapter.auto sets per-client ranks)"
        field = "client_codecs" if cfg.client_codecs else "adapter.auto"
        problems.append(Problem(field, "set", why, f"drop {field}, or secure_aggregation"))
    if cfg.data.source not in components.REGISTRIES["data source"]:
        problems.append(
            Problem(
                "data.source",
                cfg.data.source,
                "unknown data source",
                f"use one of: {', '.join(components.REGISTRIES['data source'].names())}",
            )
        )
    problems += components.check_strategy(cfg)
    problems += components.check_task(cfg)
    problems += tracker_problems(cfg.report.trackers)
    if not problems:  # engine checks need a valid strategy and codecs
        problems += components.check_engine(cfg)
    problems += components.check_data_source(cfg)
    problems += components.check_model(cfg)
    problems += audit_problems(cfg)
    return problems


def audit_problems(cfg: ExperimentConfig) -> list[Problem]:
    """Audit canaries are placed in-process: their secret stays in the run directory."""
    if cfg.audit is None or cfg.engine.name == "inprocess":
        return []
    return [
        Problem(
            "audit",
            cfg.engine.name,
            "audit canaries need the in-process engine (the inclusion bits are kept in the run directory, "
            "which Flower's SuperNodes do not see)",
            "use engine.name: inprocess, or remove the audit section",
        )
    ]


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return str(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def tracker_problems(names: Sequence[str]) -> list[Problem]:
    """A tracker whose package is not installed, by name (checked by `fedtune validate`)."""
    import importlib.util

    return [
        Problem(
            "report.trackers",
            list(names),
            f"{name!r} needs the {TRACKER_PACKAGES[name]!r} package, which is not installed",
            "pip install 'fedtune[track]'",
        )
        for name in names
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None
    ]

"""Registries: components selected by name from configs (configs never import code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from fedtune.errors import FedtuneError, Problem

T = TypeVar("T")


class UnknownComponentError(FedtuneError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to components of one kind (strategy, codec, data source, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise FedtuneError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            text = (doc or (getattr(obj, "__doc__", None) or "")).strip()
            self._docs[name] = " ".join(text.split("\n\n")[0].split())  # first paragraph
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            valid = ", ".join(sorted(self._items))
            raise UnknownComponentError(f"unknown {self.kind} {name!r}; valid: {valid}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def doc(self, name: str) -> str:
        return self._docs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The one strategy field fedtune fills in from the run (not a user parameter).
CONTEXT_FIELD = "ctx"


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
        if key == CONTEXT_FIELD:
            problems.append(Problem(f"{field}.{key}", params[key], "set by fedtune from the run", "remove it"))
        elif key not in fields:
            valid = ", ".join(sorted(set(fields) - {CONTEXT_FIELD})) or "(none)"
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
                        f"{field}.{loc}",
                        err.get("input"),
                        err["msg"],
                        f"give {field}.{loc} a value that satisfies this (`fedtune ls` says what it means)",
                    )
                )
        except (TypeError, ValueError) as e:
            problems.append(Problem(field, known, str(e), "fix the parameters"))
    return problems

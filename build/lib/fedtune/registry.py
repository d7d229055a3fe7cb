"""Registries: components selected by name from configs (configs never import code)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedtune.errors import FedtuneError

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

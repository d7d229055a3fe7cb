"""A small hierarchy of errors. Expected per-client failures are values (`ClientFailure`), not these."""

from __future__ import annotations

from dataclasses import dataclass


class FedtuneError(Exception):
    """Base of every error fedtune raises on purpose; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class Problem:
    """One problem in a configuration: where, what value, which constraint, and how to fix it."""

    field: str
    value: object
    constraint: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.constraint}. Fix: {self.fix}"


class ConfigError(FedtuneError, ValueError):
    """All problems of a configuration at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in the configuration:\n{lines}")


class DataError(FedtuneError, ValueError):
    """Data missing, unreadable, or too small for the requested partition."""


class ModelError(FedtuneError, ValueError):
    """Base model missing or unloadable."""


class IncompatibleUpdateError(FedtuneError, ValueError):
    """An update whose keys, shapes or dtypes do not match the global adapter."""


class TrainingDivergedError(FedtuneError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeError(FedtuneError, ValueError):
    """A run directory that cannot be resumed."""

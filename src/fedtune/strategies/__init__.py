"""Strategies: one file per method, registered by name."""

from fedtune.strategies import fair, fedavg, fedopt, fedsb, ffa, hetero, local, merge  # noqa: F401  (registers)
from fedtune.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy"]

"""Strategies: one file per method, registered by name."""

from fedtune.strategies import fair, fedavg, fedkseed, fedopt, fedsb, ffa, hetero, local, merge, personal, safari  # noqa: F401
from fedtune.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy"]

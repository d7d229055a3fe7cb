"""Strategies: one file per method, registered by name (importing the modules registers them)."""

from fedtune.strategies import (  # noqa: F401
    decentralized,
    dp,
    fair,
    fedavg,
    fedkseed,
    fedmm,
    fedopt,
    fedsb,
    ferret,
    ffa,
    hetero,
    local,
    merge,
    modest,
    personal,
    robust,
    safari,
)
from fedtune.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy"]

"""Strategies: one file per method, registered by name (importing the modules registers them)."""

from fedtune.strategies import (  # noqa: F401
    bristle_p2p,
    decentralized,
    dfedsam,
    dimat,
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
    pcl_p2p,
    personal,
    robust,
    safari,
    trust_distill,
)
from fedtune.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy"]

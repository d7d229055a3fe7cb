"""Who trains and who mixes in a decentralized round, computed by every peer for itself.

There is no server to draw a sample, so each peer derives the round's roles from public facts
only: the run seed, the round number and the membership it sees (the registered peers, or those
online in the round). A peer's rank for a role is a seeded hash of (seed, role, round, peer id)
(`fedtune.seeding.derive_seed`: SHA-256); the k peers of smallest rank take the role. Two peers
that see the same membership compute the same roles, whatever order they list it in, and a peer
decides its own role without asking anyone (the sampling of MoDeST, de Vos et al.,
arXiv:2302.13837, which draws its trainers and aggregators this way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedtune.seeding import derive_seed

_SCALE = float(1 << 63)  # derive_seed gives 63-bit integers: rank / _SCALE is uniform on [0, 1)


@dataclass(frozen=True)
class Roles:
    """A round's roles: `trainers` run the client step and send their model on; `mixers` combine
    what they receive (gossip: the same peers; MoDeST: the round's aggregators). Both sorted."""

    trainers: tuple[str, ...]
    mixers: tuple[str, ...]


class PeerSampler(Protocol):
    """The round's roles from the round and the membership a peer sees (no shared state)."""

    def roles(self, rnd: int, members: Sequence[str]) -> Roles: ...


def peer_rank(seed: int, role: str, rnd: int, peer: str) -> int:
    """The seeded hash that orders the peers for `role` in round `rnd` (smaller goes first)."""
    return derive_seed(seed, "peer-role", role, rnd, peer)


def hash_sample(members: Sequence[str], k: int, seed: int, rnd: int, role: str) -> tuple[str, ...]:
    """The k members of smallest rank for `role` in round `rnd`, sorted (all of them if k >= n)."""
    ranked = sorted(set(members), key=lambda p: (peer_rank(seed, role, rnd, p), p))
    return tuple(sorted(ranked[: max(0, k)]))


def hash_bernoulli(members: Sequence[str], q: float, seed: int, rnd: int, role: str) -> tuple[str, ...]:
    """Each member independently with probability q (its rank, scaled to [0, 1), below q), sorted."""
    return tuple(sorted(p for p in set(members) if peer_rank(seed, role, rnd, p) / _SCALE < q))


@dataclass(frozen=True)
class HashSampler:
    """Gossip's sampler: the same peers train and mix. `scheme` 'fixed': k = min(n, max(min_peers,
    round(fraction * n))) peers of the n members (as the server's fixed-size sample); 'poisson':
    each member with probability `fraction`."""

    fraction: float
    seed: int
    min_peers: int = 1
    scheme: str = "fixed"

    def roles(self, rnd: int, members: Sequence[str]) -> Roles:
        n = len(set(members))
        if self.scheme == "poisson":
            picked = hash_bernoulli(members, self.fraction, self.seed, rnd, "active")
        else:
            k = min(n, max(self.min_peers, round(self.fraction * n)))
            picked = hash_sample(members, k, self.seed, rnd, "active")
        return Roles(picked, picked)


@dataclass(frozen=True)
class ModestSampler:
    """MoDeST's sampler (arXiv:2302.13837): `trainers` peers of smallest 'train' rank train and
    `aggregators` peers of smallest 'aggregate' rank aggregate (two independent orders, so a
    peer may hold both roles)."""

    trainers: int
    aggregators: int
    seed: int

    def roles(self, rnd: int, members: Sequence[str]) -> Roles:
        return Roles(
            hash_sample(members, self.trainers, self.seed, rnd, "train"),
            hash_sample(members, self.aggregators, self.seed, rnd, "aggregate"),
        )

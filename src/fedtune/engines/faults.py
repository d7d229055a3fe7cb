"""Fault and attack injection for simulations, around any engine (seeded per round and client).

- `FaultInjection(engine, ...)`: dropouts (a sampled client never replies) and stragglers (a slow
  client takes 1..slowdown normal client times; past the deadline its reply is a failure), decided
  before the round from (seed, round, client), so a run is reproducible and resumable. The clients
  that will reply become the round's participants (secure aggregation masks among them).
- `AttackTransform`: a fixed seeded set of attackers poison their update on the client
  (`sign_flip`, `scale`, `gaussian`); `data` attackers train on corrupted text (`corrupt_shard`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from fedtune.client.run import ClientJob, ClientReply
from fedtune.data.blocks import Shard
from fedtune.engines.capabilities import Engine
from fedtune.seeding import numpy_rng, torch_generator
from fedtune.types import AdapterState, ClientFailure

if TYPE_CHECKING:
    from fedtune.engines.parties import Parties
    from fedtune.strategies.trust_distill import TrustDistill


def attackers(client_ids: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """round(fraction * n) clients chosen by a seeded permutation (the same in every round)."""
    k = round(fraction * len(client_ids))
    order = numpy_rng(seed, "attackers").permutation(len(client_ids))
    return frozenset(sorted(client_ids)[i] for i in order[:k])


def poison(delta: AdapterState, kind: str, scale: float, gen: torch.Generator) -> AdapterState:
    """A model-poisoning attacker's update."""
    if kind == "sign_flip":
        return {k: -scale * v if v.is_floating_point() else v for k, v in delta.items()}
    if kind == "scale":
        return {k: scale * v if v.is_floating_point() else v for k, v in delta.items()}
    if kind == "gaussian":
        return {
            k: scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in delta.items()
        }
    return delta  # 'data' poisons the training text instead


def corrupt_shard(shard: Shard, seed: int) -> Shard:
    """Data poisoning: the attacker's training blocks become random tokens of the same vocabulary."""
    gen = torch_generator(seed, "attack-data", shard.client_id)
    vocab = int(shard.train.max()) + 1
    return replace(shard, train=torch.randint(0, vocab, shard.train.shape, generator=gen))


class PoisonedShards(Mapping[str, Shard]):
    """The clients' shards with the attackers' training text poisoned (`corrupt_shard`)."""

    def __init__(self, shards: Mapping[str, Shard], bad: frozenset[str], seed: int):
        self._shards, self._bad, self._seed = shards, bad, seed

    def __getitem__(self, cid: str) -> Shard:
        shard = self._shards[cid]
        return corrupt_shard(shard, self._seed) if cid in self._bad else shard

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards)

    def __len__(self) -> int:
        return len(self._shards)


@dataclass(frozen=True)
class AttackTransform:
    """Model poisoning on the attackers' clients (an update transform)."""

    kind: str
    scale: float
    bad: frozenset[str]
    seed: int

    def __call__(self, delta: AdapterState, job: ClientJob, shard: Shard, state: Any) -> AdapterState:
        if job.client_id not in self.bad:
            return delta
        return poison(delta, self.kind, self.scale, torch_generator(self.seed, "attack", job.round, job.client_id))


@dataclass(frozen=True)
class Faults:
    """Simulated dropouts and stragglers (times in units of a normal client's round time)."""

    dropout: float = 0.0
    straggler_fraction: float = 0.0
    straggler_slowdown: float = 4.0
    deadline: float | None = None

    @property
    def timed(self) -> bool:
        return self.straggler_fraction > 0 or self.deadline is not None

    def sim_time(self, seed: int, rnd: int, cid: str) -> float:
        """Client cid's simulated round time in normal client times (seeded per round and client)."""
        if self.straggler_fraction <= 0:
            return 1.0
        rng = numpy_rng(seed, "straggler", rnd, cid)
        slow, u = rng.random() < self.straggler_fraction, rng.random()
        return 1.0 + (self.straggler_slowdown - 1.0) * float(u) if slow else 1.0

    def dropped(self, seed: int, rnd: int, cid: str) -> bool:
        return self.dropout > 0 and float(numpy_rng(seed, "dropout", rnd, cid).random()) < self.dropout


class FaultInjection:
    """Wraps an engine: injected failures never reach it; the survivors run there."""

    def __init__(self, engine: Engine, faults: Faults, seed: int):
        self.engine = engine
        self.faults = faults
        self.seed = seed
        self.capabilities = engine.capabilities
        self.peers = engine.peers

    def run(self, jobs: Sequence[ClientJob], on_step: Any = None) -> list[ClientReply | ClientFailure]:
        f = self.faults
        out: dict[str, ClientReply | ClientFailure] = {}
        times = {}
        for job in jobs:
            if f.dropped(self.seed, job.round, job.client_id):
                out[job.client_id] = ClientFailure(job.client_id, "no reply (injected dropout)", len(job.payload))
                continue
            times[job.client_id] = f.sim_time(self.seed, job.round, job.client_id)
            if f.deadline is not None and times[job.client_id] > f.deadline:
                out[job.client_id] = ClientFailure(
                    job.client_id,
                    f"missed the deadline (simulated {times[job.client_id]:.2f} > {f.deadline:g} client times)",
                    len(job.payload),
                )
        alive = tuple(sorted(c for c in times if c not in out))
        run = [replace(j, participants=alive) for j in jobs if j.client_id in alive]
        for reply in self.engine.run(run, on_step) if run else []:
            if isinstance(reply, ClientReply) and f.timed:
                reply.metrics["sim_time"] = times[reply.client_id]
            out[reply.client_id] = reply
        return [out[j.client_id] for j in jobs]

    def evaluate(self, states: Mapping[str, AdapterState], split: str = "test") -> dict[str, dict[str, Any]]:
        return self.engine.evaluate(states, split)

    def private_of(self, cid: str) -> AdapterState | None:
        return self.engine.private_of(cid)  # type: ignore[no-any-return]

    def parties(self, cfg: Any, strategy: TrustDistill, model_dir: str, tokenizer: Any) -> Parties:
        # never reached through faults: validation refuses injected faults for an own-models strategy
        return self.engine.parties(cfg, strategy, model_dir, tokenizer)

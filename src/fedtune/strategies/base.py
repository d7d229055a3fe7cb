"""The Strategy contract, its registry, and the pure aggregation functions strategies share.

A strategy is a frozen dataclass of hyperparameters plus one typed `ctx` (the run facts it may
need: seed, LoRA scale, per-client ranks, sampling rate), whose state is a plain value passed in
and returned. What a strategy can do beyond the three core methods is declared data
(`capabilities`), checked against the engine at load time; the loop never probes for methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import torch

from fedtune.adapters.base import ADAPTERS, ALGEBRA_TEXT, ANY_ALGEBRA, Algebra
from fedtune.errors import FedtuneError, Problem
from fedtune.registry import Registry
from fedtune.types import AdapterState, ClientUpdate

if TYPE_CHECKING:
    from fedtune.client.run import ClientStep


@dataclass(frozen=True)
class Capabilities:
    """What a strategy needs or does besides init_state / configure / aggregate.

    Attributes:
        has_global: there is one shared model to evaluate and export.
        personalized: each client ends with its own model (configure sends it).
        pools_data: trains on the pooled data of all clients (the centralized upper bound).
        transmits: model payloads cross the network (False for local / centralized).
        sum_only: aggregates only a weighted sum of the updates (works under secure aggregation);
            `sum_weight` says the weight of a client in that sum.
        client_private: keeps tensors on the clients (`private_keys`): client state between rounds.
        scores_peers: its aggregate asks the clients / the server's reference set to score models
            (the `peers` argument of aggregate).
        client_step: replaces the first-order client update (`client_train`).
        client_transform: changes each update on the client before masking (`client_transform`).
        client_penalty: adds a client-side regulariser (`client_penalty`).
        heterogeneous_ranks: accepts one LoRA rank per client (`adapter.ranks`).
        algebras: the adapter updates it is correct for (`adapters.base.Algebra`): exact LoRA
            maths needs `s * B @ A` (LORA_PRODUCT); FedAvg-family strategies take any state.
        raw_data: moves raw client data (tokens) off the clients (PCL predictions, Bristle).
        base_offsets: writes offsets into the frozen base weights (merges, full-weight zeroth order):
            they need an fp32 base (bf16 rounding would swallow a small offset).
        accounts_sampling: its privacy accounting depends on the client sampling rate (DP-FedAvg).
        peer_to_peer: no server: peers exchange states with their neighbours (gossip); the loop's
            relay of states is simulation plumbing, the strategy counts the peer messages.
        sharpness_aware: its local steps are SAM's (DFedSAM): needs `train.sam_rho` > 0.
        own_models: every party trains its own model (any architecture) and only predictions
            travel (trust_distill): the loop is `recipes/distill.py`.
        own_sampling: its sampler picks each round's peers from its own parameters (MoDeST's
            trainers and aggregators): `sampling.fraction` and `sampling.min_clients` do not apply.
        strategy_private: its clients keep tensors that are not adapter tensors (FedMM's dual
            variables, under `client.run.STRATEGY_PRIVATE`): the engine must never load them into the model.
    """

    has_global: bool = True
    personalized: bool = False
    pools_data: bool = False
    transmits: bool = True
    sum_only: bool = False
    sum_weight: str = "examples"  # or "uniform"
    client_private: bool = False
    scores_peers: bool = False
    client_step: bool = False
    client_transform: bool = False
    client_penalty: bool = False
    heterogeneous_ranks: bool = False
    algebras: frozenset[Algebra] = ANY_ALGEBRA
    raw_data: bool = False
    base_offsets: bool = False
    accounts_sampling: bool = False
    peer_to_peer: bool = False
    sharpness_aware: bool = False
    own_models: bool = False
    own_sampling: bool = False
    strategy_private: bool = False

    def weight(self, num_examples: int) -> float:
        """A client's weight in a masked sum."""
        return 1.0 if self.sum_weight == "uniform" else float(num_examples)


@dataclass(frozen=True)
class RunContext:
    """Run facts a strategy may need (filled by fedtune's builder; users cannot set them)."""

    seed: int = 0
    lora_scale: float = 1.0
    client_ranks: Mapping[str, int] = field(default_factory=dict)
    train_lr: float = 1e-3
    sampling_rate: float = 1.0  # the real per-round inclusion probability of a client
    sampling_scheme: str = "poisson"  # how clients are drawn: 'poisson' or 'fixed' (without replacement)
    num_clients: int = 1  # registered clients
    sample_size: int = 1  # clients drawn per round (fixed scheme)
    client_ids: tuple[str, ...] = ()  # the registered clients (a decentralized strategy's peers)
    randomness: str = "seeded"  # privacy noise: 'seeded' (reproducible simulation) or 'secure' (OS CSPRNG)
    hidden_size: int = 0  # the base model's hidden width (FedMM's discriminator input); 0: unknown


@dataclass(frozen=True)
class Aggregate:
    """What a strategy's aggregate returns: the new global adapter and strategy state, the
    round's metrics (recorded, never checkpointed as state), bytes the strategy moved besides the
    adapter payloads (with `per_client`, each client's share: {id: {bytes_up, bytes_down}}), and a
    reason to stop the run after this round (e.g. DP's target epsilon)."""

    global_state: AdapterState
    state: Any
    metrics: Mapping[str, Any] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    stop: str | None = None
    per_client: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class PeerScoring(Protocol):
    """What a scoring strategy (PCL val / predictions, Bristle) may ask the engine."""

    def peer_evaluate(
        self, states: Mapping[str, AdapterState], split: str = "val", max_blocks: int | None = None
    ) -> dict[str, dict[str, float]]: ...

    def reference_blocks(self, per_client: int) -> torch.Tensor: ...

    def reference_logits(self, states: Mapping[str, AdapterState], blocks: torch.Tensor, k: int) -> dict[str, Any]: ...

    def reference_losses(self, states: Mapping[str, AdapterState], per_client: int) -> dict[str, dict[str, float]]: ...

    def receiver_losses(
        self, wanted: Mapping[str, Mapping[str, AdapterState]], max_blocks: int | None = None
    ) -> dict[str, dict[str, float]]: ...


class StrategyCore(Protocol):
    """What every registered strategy has (`StrategyBase` gives the defaults): its declared
    capabilities, the run's facts, and the client-side parts the plan takes. The loops narrow it by
    a declared capability: to `Strategy` (a server aggregates), `PeerStrategy` (`peer_to_peer`),
    `ClientStepStrategy` (`client_step`), `ClientTransformStrategy` (`client_transform`)."""

    capabilities: Capabilities
    ctx: RunContext

    def private_keys(self, state: AdapterState) -> set[str]: ...

    def client_penalty(self, params: Mapping[str, torch.nn.Parameter], received: AdapterState) -> Any: ...


class Strategy(StrategyCore, Protocol):
    """Server-side logic of a method. State is a plain value passed in and returned, so a
    checkpoint is just that value and a resumed run continues exactly."""

    def init_state(self, global_state: AdapterState) -> Any: ...

    def configure(self, rnd: int, client_ids: Sequence[str], state: Any) -> Mapping[str, AdapterState]: ...

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: Any, peers: PeerScoring | None = None
    ) -> Aggregate: ...


class ClientStepStrategy(StrategyCore, Protocol):
    """`capabilities.client_step`: the strategy's own client update, a `client.run.ClientStep`
    (the method `client_train(model, received, private, shard, spec, seed, rnd, on_step, adapter)`)."""

    @property
    def client_train(self) -> ClientStep: ...


class ClientTransformStrategy(StrategyCore, Protocol):
    """`capabilities.client_transform`: a client-side step on the update before secure-aggregation
    masking (DP-FedAvg's clip and noise share), with what the client needs from the server state."""

    def client_transform_config(self, state: Any) -> dict[str, Any]: ...

    def client_transform(self, delta: AdapterState, state: Any, rnd: int, client_id: str, n: int) -> AdapterState: ...


def client_step_of(strategy: StrategyCore) -> ClientStepStrategy | None:
    """The strategy as a ClientStepStrategy where it declares `capabilities.client_step` (the
    registry's contract: a declared capability comes with its methods), else None."""
    return cast(ClientStepStrategy, strategy) if strategy.capabilities.client_step else None


def client_transform_of(strategy: StrategyCore) -> ClientTransformStrategy | None:
    """The strategy as a ClientTransformStrategy where it declares `capabilities.client_transform`."""
    return cast(ClientTransformStrategy, strategy) if strategy.capabilities.client_transform else None


def server_strategy(strategy: StrategyCore, name: str) -> Strategy:
    """`strategy` as the federated loop sees it: every strategy that declares neither
    `peer_to_peer` nor `own_models` (those have their own loops) aggregates on a server."""
    caps = strategy.capabilities
    if caps.peer_to_peer or caps.own_models:
        raise FedtuneError(f"strategy.name {name!r} has its own loop (peer_to_peer / own_models), not a server's")
    return cast(Strategy, strategy)


STRATEGIES: Registry[type] = Registry("strategy")


@dataclass(frozen=True)
class StrategyBase:
    """Defaults of the optional parts of the contract (used only when a capability says so)."""

    ctx: RunContext = field(default_factory=RunContext, repr=False, compare=False)

    capabilities: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def config_problems(cls, params: dict[str, Any], adapter: Any, codec: Any, secure: bool) -> list[Any]:
        """Cross-field problems of this strategy's parameters with the adapter, the downlink
        codec and secure aggregation (load time)."""
        return []

    def sample_problems(self, k: int) -> list[Any]:
        """Problems with aggregating k updates a round (checked for the configured sample size)."""
        return []

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Any]:
        """Problems with the registered clients as this strategy's peers (a decentralized topology
        drawn from the run seed)."""
        return []

    def private_keys(self, state: AdapterState) -> set[str]:
        """client_private: the tensors that never leave a client."""
        return set()

    def client_penalty(self, params: Mapping[str, torch.nn.Parameter], received: AdapterState) -> Any:
        """client_penalty: a regulariser factory (returns a zero-argument loss function or None)."""
        return None


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j (FedAvg weights)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [u.num_examples / total for u in updates]


def weighted_mean(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """sum_k w_k * state_k, key by key (fp64 accumulation, fp32 result)."""
    out: AdapterState = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += w * s[key].to(torch.float64)
        out[key] = acc.to(torch.float32)
    return out


def sorted_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Updates in client-id order, so aggregation does not depend on arrival order."""
    return sorted(updates, key=lambda u: u.client_id)


#: (new global adapter, strategy-state entries to update, round metrics)
Combined = tuple[AdapterState, dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class GlobalModel(StrategyBase):
    """Plumbing shared by strategies with one global adapter (one level of inheritance):
    state = {"global": adapter, ...}; `send` picks what a client receives (all of it by default);
    `combine` does the method's maths on the updates in client-id order."""

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state}

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return state["global"]  # type: ignore[no-any-return]

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return {cid: self.send(state, cid) for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        if not updates:
            return Aggregate(state["global"], state)
        new, extra, metrics = self.combine(rnd, sorted_updates(updates), state)
        return Aggregate(new, {**state, **extra, "global": new}, metrics)

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        """(new global, state entries to update, metrics) from sorted, non-empty updates."""
        raise NotImplementedError


EXACT_LORA = frozenset({Algebra.LORA_PRODUCT})  # strategies that compute products B @ A of the factors


def algebra_problems(who: str, caps: Capabilities, kind: str) -> list[Problem]:
    """A strategy (`who`) refusing an adapter kind whose update is not what its maths needs."""
    have = ADAPTERS.get(kind).algebra
    if have in caps.algebras:
        return []
    kinds = [k for k in ADAPTERS if ADAPTERS.get(k).algebra in caps.algebras]
    needs = " or ".join(ALGEBRA_TEXT[a] for a in sorted(caps.algebras))
    return [
        Problem(
            "adapter.kind",
            kind,
            f"{who} needs adapter.kind {' or '.join(repr(k) for k in kinds)}: its aggregation is exact only for "
            f"updates {needs}, and adapter {kind!r} updates are {ALGEBRA_TEXT[have]}",
            f"set adapter.kind: {kinds[0]}, or use a strategy that averages any adapter state (fedavg, fedit, ...)",
        )
    ]


def inner_strategy(name: str, ctx: RunContext) -> Any:
    """A wrapped strategy (DP-FedAvg's, FedOpt's inner), built with the same run context."""
    return STRATEGIES.get(name)(ctx=ctx)

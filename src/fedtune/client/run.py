"""The one client path every engine runs: values in, values out.

    run_client(job, model, shard, plan) -> (reply, client state)

    decode the downlink payload (with the client's downlink decoder state)
      -> train (the first-order client round, or the strategy's own client step)
      -> update transforms in order (attack injection, DP clip + noise share, secure-aggregation mask)
      -> encode the uplink payload (with the client's uplink encoder state)

The in-process engine and the Flower ClientApp both call it (and, next, decentralized peers);
none re-implements a step. What a client keeps between rounds is a `ClientState` value that the
caller loads before and stores after (in-process: the client-state store; Flower: the SuperNode's
own disk), never the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fedtune.adapters.base import Adapter
from fedtune.client.round import PenaltyFactory, client_round
from fedtune.client.train import TrainSpec
from fedtune.codecs.base import Codec
from fedtune.data.blocks import Shard
from fedtune.seeding import torch_generator
from fedtune.types import AdapterState

StepCallback = Callable[[int, int, float], None]


class ClientStep(Protocol):
    """A strategy's own client update in place of the first-order round (`capabilities.client_step`:
    FedKSeed, Ferret, FedMM): (delta, metrics, new private state)."""

    def __call__(
        self,
        model: Any,
        received: AdapterState,
        private: AdapterState,
        shard: Shard,
        spec: TrainSpec,
        seed: int,
        rnd: int,
        on_step: StepCallback | None = None,
        adapter: Adapter | None = None,
    ) -> tuple[AdapterState, dict[str, float], AdapterState]: ...


# private tensors under this key prefix belong to a strategy's client step (FedMM's dual variables),
# not to the model: engines never load them into it (`model_private`)
STRATEGY_PRIVATE = "strategy/"


def model_private(private: AdapterState) -> AdapterState:
    """The client-private tensors that are part of the client's model (not a strategy's own)."""
    return {k: v for k, v in private.items() if not k.startswith(STRATEGY_PRIVATE)}


# what a client reply may carry when its metrics are withheld (DP or secure aggregation): facts about
# the protocol, not about the data (the accountant's step count and rate, time, the codec's choices)
PROTOCOL_METRICS = frozenset(
    {"steps", "train_seconds", "client_seconds", "dp_steps", "dp_rate", "codec_bits", "codec_skipped"}
)


@dataclass(frozen=True)
class PeerState:
    """A decentralized peer's own model and mixing state (kept in its `ClientState`, never on a
    server).

    Attributes:
        x: the peer's model as it mixes (the adapter state; push-sum's numerator).
        w: its push-sum weight (1 under symmetric mixing); the peer trains and exports z = x / w.
    """

    x: AdapterState
    w: float = 1.0

    def model(self) -> AdapterState:
        """z = x / w: the de-biased model the peer trains from, is evaluated on and exports."""
        return self.x if self.w == 1.0 else {k: v / self.w for k, v in self.x.items()}


@dataclass(frozen=True)
class ClientState:
    """What one client keeps between rounds.

    Attributes:
        private: tensors that never leave the client (CoMiGS specialists and router, FedKSeed's
            and Ferret's copy of the model); empty for most strategies.
        up_codec: the uplink encoder's state (error-feedback residual, AQUILA's last upload).
        down_codec: the downlink decoder's state (mirror of the server's downlink encoder).
        rounds: rounds this client has trained in.
        secagg_key: the X25519 private key of the secure-aggregation round it is in (never sent).
        peer: a decentralized peer's model and mixing state (None: not a peer, or the initial adapter).
    """

    private: AdapterState = field(default_factory=dict)
    up_codec: Any = None
    down_codec: Any = None
    rounds: int = 0
    secagg_key: bytes = b""
    peer: PeerState | None = None


@dataclass(frozen=True)
class ClientJob:
    """One client's work in one round (built by the server loop).

    Attributes:
        round: the round number.
        client_id: who runs it.
        payload: the encoded downlink message.
        participants: the clients of this round that are expected to reply (secure aggregation
            masks pairwise among them; DP noise shares are sized for them).
        transform: the strategy's per-round client parameters (DP-FedAvg's clip).
        run: the run's token (a client keeps its state per run, so a new run never reads an old
            run's state and a resumed one finds its own).
        peer_keys: the public keys the round's participants advertised (secure aggregation).
    """

    round: int
    client_id: str
    payload: bytes
    participants: tuple[str, ...] = ()
    transform: Mapping[str, Any] = field(default_factory=dict)
    run: str = ""
    peer_keys: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientReply:
    """What a client sends back: the encoded uplink payload, its example count and metrics, and
    the bytes its exchange moved (the payload lengths, or every protocol message under SecAgg+)."""

    client_id: str
    payload: bytes
    num_examples: int
    metrics: dict[str, float]
    bytes_down: int
    bytes_up: int


class UpdateTransform(Protocol):
    """A client-side step on the update between training and encoding (like a Flower client mod)."""

    def __call__(self, delta: AdapterState, job: ClientJob, shard: Shard, state: ClientState) -> AdapterState: ...


@dataclass(frozen=True)
class ClientPlan:
    """How every client of a run turns a job into a reply (built once from the config by
    `fedtune.client.plan.build_plan`, identically on every engine).

    Attributes:
        spec: local training hyperparameters.
        seed: the run seed (batch order, LoRA dropout, codec rounding).
        up_codec, down_codec: the uplink and downlink codecs.
        client_up_codecs: a client's own uplink codec where it has one (`client_codecs`).
        step: the strategy's own client update (FedKSeed, Ferret) or None for the first-order round.
        penalty: a strategy's client-side regulariser factory (HetLoRA) or None.
        transforms: update transforms in order (attack, DP share, secure-aggregation mask).
        variants: per-client adapter variants, e.g. a mixture's expert counts ({} = all the same).
        adapter: the run's adapter with its options (parameter groups, auxiliary loss); None:
            the injected kind with default options.
        client_lr: per-client local learning rates (`train.client_lr`; the others use spec.lr).
        private_init: the initial client-private tensors (the same for every client).
        secure_aggregation: clients mask their uploads (in-process pairwise masks).
        randomness: 'secure' (OS CSPRNG) or 'seeded' (simulation) for mask keys.
        release_metrics: send the training metrics (loss); False keeps only `PROTOCOL_METRICS`.
    """

    spec: TrainSpec
    seed: int
    up_codec: Codec
    down_codec: Codec
    step: ClientStep | None = None
    penalty: PenaltyFactory | None = None
    transforms: Sequence[UpdateTransform] = ()
    variants: Mapping[str, int] = field(default_factory=dict)
    adapter: Adapter | None = None
    client_lr: Mapping[str, float] = field(default_factory=dict)
    client_up_codecs: Mapping[str, Codec] = field(default_factory=dict)
    private_init: AdapterState = field(default_factory=dict)
    secure_aggregation: bool = False
    randomness: str = "seeded"
    release_metrics: bool = True

    def initial_state(self) -> ClientState:
        return ClientState(private=dict(self.private_init))


def run_client(
    job: ClientJob,
    model: Any,
    shard: Shard,
    plan: ClientPlan,
    state: ClientState,
    on_step: StepCallback | None = None,
) -> tuple[ClientReply, ClientState]:
    """One client's round on `model` (shared; only its adapter tensors are overwritten)."""
    t0 = time.perf_counter()
    received, down_state = plan.down_codec.decode(job.payload, state.down_codec)
    lr = plan.client_lr.get(job.client_id)
    spec = plan.spec if lr is None else replace(plan.spec, lr=lr)
    if plan.step is not None:
        delta, metrics, private = plan.step(
            model, received, state.private, shard, spec, plan.seed, job.round, on_step, adapter=plan.adapter
        )
    else:
        delta, metrics, private = client_round(
            model,
            received,
            shard,
            spec,
            plan.seed,
            job.round,
            on_step,
            plan.penalty,
            private=state.private,
            variant=plan.variants.get(job.client_id),
            adapter=plan.adapter,
        )
    for transform in plan.transforms:
        delta = transform(delta, job, shard, state)
    up, up_state = plan.client_up_codecs.get(job.client_id, plan.up_codec).encode(
        delta, state.up_codec, torch_generator(plan.seed, "codec-up", job.round, job.client_id)
    )
    metrics = dict(metrics)
    for st in up_state or []:  # what an adaptive codec decided (AQUILA: bits, skipped)
        if isinstance(st, dict):
            metrics.update(st.get("report", {}))
    metrics["client_seconds"] = time.perf_counter() - t0
    if not plan.release_metrics:  # outside the DP guarantee, and not hidden by secure aggregation
        metrics = {k: v for k, v in metrics.items() if k in PROTOCOL_METRICS}
    reply = ClientReply(job.client_id, up, shard.num_examples, metrics, len(job.payload), len(up))
    new_state = replace(state, private=private, up_codec=up_state, down_codec=down_state, rounds=state.rounds + 1)
    return reply, new_state


def advertise(job: ClientJob, plan: ClientPlan, state: ClientState) -> tuple[bytes, ClientState]:
    """Secure aggregation's first step on a client: a fresh key pair for this round; the public
    key goes to the server (and on to the other participants), the private key stays in the state."""
    from fedtune.secagg import new_private_key, public_key

    private = new_private_key(plan.randomness, plan.seed, job.round, job.client_id)
    return public_key(private), replace(state, secagg_key=private)

"""What each engine can carry, as declared data, and the problems a config has on an engine.

Checked by `fedtune validate` and before any weights load (config loading), so an experiment the
chosen engine cannot run exactly is refused with a message instead of run differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from fedtune.adapters import build_adapter
from fedtune.errors import Problem

if TYPE_CHECKING:
    from fedtune.client.run import ClientJob, ClientReply
    from fedtune.engines.parties import Parties
    from fedtune.strategies.trust_distill import TrustDistill
    from fedtune.types import AdapterState, ClientFailure


@dataclass(frozen=True)
class EngineCapabilities:
    """Attributes:
    client_state: keeps client-private tensors between rounds (CoMiGS experts, FedKSeed's w0).
    stateful_codecs: keeps codec state per sender and receiver (error feedback, AQUILA).
    peer_scoring: clients score peers' models / the server scores a reference set (PCL, Bristle).
    fault_injection: simulated dropouts, stragglers and attacks.
    pooled_data: the centralized baseline (raw data in one place).
    ood: the out-of-distribution test (every client's test data pooled).
    per_client_experts: mixture adapters with a different expert count per client.
    client_data_init: LoRA-SB initialised from a client's data on the server.
    secure_codecs: downlink codecs allowed with secure aggregation ('any' or 'identity'; an uplink
        codec is refused on every engine: a masked share cannot be compressed).
    peer_to_peer: runs strategies without a server (gossip between peers); in-process it is a
        simulation of the peer network in one process.
    real_parties: clients are separate parties whose evaluation replies leave them (a deployment);
        in simulation the experimenter measures the model with every client's data in hand.
    server: has a server (or a loop's process) that aggregates; False for a swarm of peer
        processes, which runs only serverless strategies (`peer_to_peer`) and no secure aggregation.
    strategy_private: client state may hold a strategy's own tensors besides adapter tensors (FedMM's
        duals), which evaluation leaves out of the model.
    own_models: runs parties that each keep their own model and send predictions, not adapters
        (trust_distill): the engine's `parties(...)` (`engines/parties.py`'s `Parties`).
    """

    name: str
    client_state: bool
    stateful_codecs: bool
    peer_scoring: bool
    fault_injection: bool
    pooled_data: bool
    ood: bool
    per_client_experts: bool
    client_data_init: bool
    secure_codecs: str
    peer_to_peer: bool
    real_parties: bool = False
    strategy_private: bool = False
    server: bool = True
    own_models: bool = False


INPROCESS = EngineCapabilities(
    "inprocess", True, True, True, True, True, True, True, True, "any", True, False, True, own_models=True
)
# on Flower, client state lives on each SuperNode's disk (`engines/flower/client_app.py`); a
# trust_distill party's own model on its SuperNode (`engines/flower/parties.py`)
FLOWER = EngineCapabilities(
    "flower", True, True, False, False, False, False, False, False, "identity", False, own_models=True
)
# simulated dropouts, stragglers and attacks wrap the Flower engine in simulation as well
FLOWER_SIM = replace(FLOWER, name="flower-sim", fault_injection=True)
# a local swarm of `fedtune peer` processes over hivemind: each peer holds its own data and state
# on its own disk (client_state), messages are encoded by the run's (stateless) codec, a receiver
# scores what it received on its own data (Bristle), failures are real
P2P_LOCAL = EngineCapabilities(
    "p2p-local", True, False, True, False, False, False, False, False, "identity", True, False, server=False
)
ENGINES = {
    "inprocess": INPROCESS,
    "flower-sim": FLOWER_SIM,
    "flower-deploy": replace(FLOWER, real_parties=True),
    "p2p-local": P2P_LOCAL,
}

_INPROCESS = "run it with engine.name: inprocess"


def engine_problems(engine: EngineCapabilities, cfg: Any, caps: Any, stateful_codec: bool) -> list[Problem]:
    """Everything `engine` cannot do for this config (strategy capabilities `caps`)."""
    field, value = "engine.name", cfg.engine.name
    out: list[Problem] = []

    def need(ok: bool, where: str, got: Any, why: str, fix: str) -> None:
        if not ok:
            out.append(Problem(where, got, f"on engine {engine.name!r}: {why}", fix))

    s = cfg.strategy.name
    private = caps.accounts_sampling or cfg.train.dp_sgd is not None or cfg.secure_aggregation
    need(
        not (engine.real_parties and private and cfg.privacy.release_client_metrics is None),
        "privacy.release_client_metrics",
        None,
        "each client's evaluation metrics (loss, accuracy, a generated answer) leave it in the clear, outside "
        "the DP guarantee and not hidden by secure aggregation",
        "set privacy.release_client_metrics: true to send them (recorded), or false to withhold training metrics "
        "and accept that evaluation replies still leave the clients",
    )
    need(engine.pooled_data or not caps.pools_data, field, value, "the centralized baseline pools raw data", _INPROCESS)
    need(
        engine.client_state or not caps.client_private,
        field,
        value,
        f"strategy {s!r} keeps client-side state between rounds, which this engine does not carry yet",
        _INPROCESS,
    )
    need(
        engine.strategy_private or not caps.strategy_private,
        field,
        value,
        f"strategy {s!r} keeps its own client-side tensors (dual variables) besides the adapter, which this "
        "engine's client state would load into the model",
        _INPROCESS,
    )
    need(
        engine.peer_to_peer or not caps.peer_to_peer,
        field,
        value,
        f"strategy {s!r} has no server (peers average with their graph neighbours), and Flower's runtime "
        "routes every message through the SuperLink",
        _INPROCESS,
    )
    need(
        engine.server or caps.peer_to_peer,
        field,
        value,
        f"strategy {s!r} aggregates on a server, and a swarm of peers has none (each peer trains and mixes "
        "with its graph neighbours)",
        "use a serverless strategy (strategy.name: gossip or modest), or engine.name: inprocess / flower-sim",
    )
    need(
        engine.server or not cfg.secure_aggregation,
        "secure_aggregation",
        True,
        "secure aggregation hides each update inside a server's sum, and a swarm has no server: each peer "
        "receives its neighbours' adapters themselves",
        "set secure_aggregation: false (the peers' libp2p streams are encrypted against outsiders, not against "
        "the receiving neighbour), or use a server strategy on engine.name: inprocess / flower-deploy",
    )
    need(
        engine.own_models or not caps.own_models,
        field,
        value,
        f"strategy {s!r} runs parties that each keep their own model (each its own architecture) and a "
        "server that mixes their predictions, which this engine does not carry",
        "run it with engine.name: inprocess, flower-sim or flower-deploy",
    )
    if caps.own_models:  # every party works every round: no sampling, no simulated faults
        smp = cfg.sampling
        for key, v, fix in (
            ("fraction", smp.fraction, 1.0),
            ("dropout", smp.dropout, 0.0),
            ("straggler_fraction", smp.straggler_fraction, 0.0),
            ("deadline", smp.deadline, None),
        ):
            need(
                v == fix,
                f"sampling.{key}",
                v,
                f"strategy {s!r} asks every party every round (the trust matrix is over all of them); "
                "a party that really fails is recorded, but sampling and simulated faults are not applied",
                f"set sampling.{key}: {'null' if fix is None else fix} "
                "(to simulate a bad party: strategy.parties with {init: random})",
            )
    need(
        engine.peer_scoring or not caps.scores_peers,
        field,
        value,
        f"strategy {s!r} scores models on clients' data during aggregation, which this engine cannot do",
        _INPROCESS,
    )
    need(
        engine.stateful_codecs or not stateful_codec,
        "codec",
        cfg.codec.name,
        "this codec keeps state between rounds (error feedback, lazy uploads), which this engine does not carry yet",
        "use a stateless codec (identity, fp16, quantize) or engine.name: inprocess",
    )
    for n in build_adapter(cfg.adapter).engine_needs():  # what the adapter needs from the engine, as data
        need(bool(getattr(engine, n.capability)), n.field, n.value, n.reason, n.fix.format(inprocess=_INPROCESS))
    down = cfg.downlink_codec if cfg.downlink_codec is not None else cfg.codec
    if cfg.secure_aggregation and engine.secure_codecs == "identity" and cfg.codec.name == "identity":
        need(  # an uplink codec is refused on every engine (components.check_strategy)
            down.name == "identity",
            "downlink_codec.name",
            down.name,
            "with secure aggregation, SecAgg+ quantizes and masks the update itself",
            "use no downlink_codec (identity)",
        )
    if not engine.fault_injection:
        need(
            cfg.attack.kind == "none",
            "attack.kind",
            cfg.attack.kind,
            "attack injection is a simulation feature of the in-process engine",
            "set attack.kind: none, or " + _INPROCESS,
        )
        need(
            cfg.sampling.dropout == 0,
            "sampling.dropout",
            cfg.sampling.dropout,
            "fault injection is for the in-process engine; here failures are real (timeouts)",
            "set sampling.dropout: 0 (use engine.timeout and sampling.min_updates)",
        )
        for key in ("straggler_fraction", "deadline"):
            v = getattr(cfg.sampling, key)
            need(
                not v,
                f"sampling.{key}",
                v,
                "simulated stragglers and deadlines are for the in-process engine; here a reply later than "
                "engine.timeout seconds is a recorded failure",
                f"drop sampling.{key} (use engine.timeout and sampling.min_updates)",
            )
        need(
            not getattr(cfg.sampling, "link_drop", 0.0),
            "sampling.link_drop",
            getattr(cfg.sampling, "link_drop", 0.0),
            "simulated lossy links are for the in-process engine; between peer processes a message that does "
            "not arrive by engine.timeout is really lost (recorded)",
            "set sampling.link_drop: 0",
        )
    need(
        engine.name != "flower" or cfg.engine.name != "flower-deploy" or cfg.randomness() == "secure",
        "privacy.randomness",
        cfg.privacy.randomness,
        "a deployment's privacy noise and mask secrets must come from the OS CSPRNG (seeded noise can be "
        "regenerated by anyone holding the config)",
        "set privacy.randomness: secure (or auto)",
    )
    need(
        engine.ood or not cfg.evaluation.ood,
        "evaluation.ood",
        True,
        "the out-of-distribution test pools every client's test data in one place",
        "set evaluation.ood: false, or " + _INPROCESS,
    )
    return out


class Engine(Protocol):
    """A transport: where `run_client` runs. Built complete (nothing set after construction).

    `run` turns jobs into replies or expected failures; `evaluate` scores states on the clients'
    own data; `private_of` is a client's private tensors when the engine holds them (None: they
    stay on the clients); `peers` answers scoring strategies (None: the engine cannot)."""

    capabilities: EngineCapabilities
    peers: Any

    def run(self, jobs: Sequence[ClientJob], on_step: Any = None) -> list[ClientReply | ClientFailure]: ...

    def evaluate(self, states: Mapping[str, AdapterState], split: str = "test") -> dict[str, dict[str, Any]]: ...

    def private_of(self, cid: str) -> Any: ...

    def parties(self, cfg: Any, strategy: TrustDistill, model_dir: str, tokenizer: Any) -> Parties:
        """The parties of an own-models strategy (trust_distill): their own models, where they live."""
        ...

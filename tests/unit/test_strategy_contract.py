"""A declared capability comes with its methods: the loops narrow a `Strategy` to the protocol a
capability names (`client_step_of`, `client_transform_of`, `as_peer_strategy`) without probing, so
every registered strategy that declares one must have that protocol's methods."""

import inspect

import pytest

from fedtune.errors import FedtuneError
from fedtune.strategies import STRATEGIES
from fedtune.strategies.base import ClientStepStrategy, ClientTransformStrategy, Strategy, StrategyCore, server_strategy
from fedtune.strategies.decentralized import PeerStrategy, as_peer_strategy


def members(protocol: type) -> set[str]:
    """The methods and attributes a protocol adds (its own body and its protocol bases')."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls is object or not getattr(cls, "_is_protocol", False):
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")} | set(getattr(cls, "__annotations__", {}))
    return names


CONTRACTS = {
    "client_step": ClientStepStrategy,
    "client_transform": ClientTransformStrategy,
    "peer_to_peer": PeerStrategy,
}


def test_the_protocols_name_what_the_loops_call() -> None:
    assert {"client_train", "capabilities", "private_keys"} <= members(ClientStepStrategy)
    assert {"configure", "aggregate", "init_state", "client_penalty"} <= members(Strategy)
    assert {"client_transform", "client_transform_config"} <= members(ClientTransformStrategy)
    assert {"sampler", "sources", "coefficients", "message", "mix", "private_keys"} <= members(PeerStrategy)
    assert "aggregate" not in members(PeerStrategy)  # a peer strategy has no server side
    assert "aggregate" not in members(PeerStrategy)  # a peer strategy has no server side


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_has_the_methods_of_what_it_declares(name: str) -> None:
    from fedtune.strategies.base import RunContext

    cls = STRATEGIES.get(name)
    caps = cls(ctx=RunContext()).capabilities  # with its default parameters (some derive capabilities)
    missing = {m for m in members(StrategyCore) if not hasattr(cls, m) and m not in cls.__dataclass_fields__}
    assert not missing, f"{name} lacks StrategyCore's {sorted(missing)}"
    serverless = caps.peer_to_peer or caps.own_models  # their own loops; every other one aggregates on a server
    for capability, protocol in [*CONTRACTS.items(), *([] if serverless else [("a server", Strategy)])]:
        if capability == "a server" or getattr(caps, capability):
            core = members(StrategyCore)
            lacking = sorted(m for m in members(protocol) - core if not callable(getattr(cls, m, None)))
            assert not lacking, f"{name} declares {capability} but lacks {lacking}"
    if caps.client_step:  # the plan calls it as client.run.ClientStep
        params = list(inspect.signature(cls.client_train).parameters)
        assert params[:8] == ["self", "model", "received", "private", "shard", "spec", "seed", "rnd"]


def test_a_server_strategy_is_refused_as_a_peer_by_name() -> None:
    from fedtune.strategies.base import RunContext

    fedavg = STRATEGIES.get("fedavg")(ctx=RunContext())
    with pytest.raises(FedtuneError, match="'fedavg' aggregates on a server"):
        as_peer_strategy(fedavg, "fedavg")
    gossip = STRATEGIES.get("gossip")(ctx=RunContext())
    assert as_peer_strategy(gossip, "gossip") is gossip
    with pytest.raises(FedtuneError, match="'gossip' has its own loop"):
        server_strategy(gossip, "gossip")
    assert server_strategy(fedavg, "fedavg") is fedavg
    with pytest.raises(FedtuneError, match="'gossip' has its own loop"):
        server_strategy(gossip, "gossip")
    assert server_strategy(fedavg, "fedavg") is fedavg

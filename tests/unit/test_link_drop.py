"""Unreliable links (`sampling.link_drop`): a lost message is counted as sent, not received; the
receiver's row moves the lost weight onto its own model (the row stays stochastic); push-sum loses
x and w together so the peers' de-biased models still agree in the limit; drops are seeded per
(round, sender, receiver) at the configured rate; a server strategy refuses the option."""

import pytest
import torch

from fedtune.client.run import PeerState
from fedtune.codecs import serialize
from fedtune.recipes.decentralized import Links, exchange
from fedtune.strategies.base import RunContext
from fedtune.strategies.decentralized import Gossip

KEY = "m.lora_B.weight"
IDS = ("a", "b", "c")


def at(values) -> dict[str, PeerState]:
    return {c: PeerState({KEY: torch.tensor([[v]])}) for c, v in zip(IDS, values)}


def test_a_lost_message_moves_its_weight_to_the_receiver_and_is_counted_as_sent() -> None:
    g = Gossip(topology="complete", ctx=RunContext(client_ids=IDS))  # Metropolis on K3: every weight 1/3
    links = Links(0.5, seed=3)
    rnd = next(r for r in range(1, 50) if 0 < sum(links.lost(r, i, j) for i in IDS for j in IDS if i != j) < 6)
    lost = {(i, j) for i in IDS for j in IDS if i != j and links.lost(rnd, i, j)}
    start = {"a": 0.0, "b": 3.0, "c": 9.0}
    mixed, per_peer, metrics = exchange(g, rnd, at(start.values()), links=links)
    size = len(serialize({KEY: torch.zeros(1, 1)}))
    for j in IDS:  # by hand: x_j = sum of the arrived x_i / 3 + (1 + lost ones) / 3 * x_j
        arrived = [i for i in IDS if i != j and (i, j) not in lost]
        expect = (sum(start[i] for i in arrived) + (3 - len(arrived)) * start[j]) / 3
        assert mixed[j].x[KEY].item() == pytest.approx(expect)
        assert per_peer[j]["bytes_up"] == 2 * size  # sent to both neighbours, lost or not
        assert per_peer[j]["bytes_down"] == len(arrived) * size
    assert metrics["dropped_messages"] == len(lost) and metrics["gossip_messages"] == 6 - len(lost)


def test_drops_are_seeded_per_link_and_round_at_the_rate() -> None:
    links = Links(0.3, seed=0)
    draws = [links.lost(r, i, j) for r in range(1, 400) for i in IDS for j in IDS if i != j]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [Links(0.3, seed=0).lost(r, i, j) for r in range(1, 400) for i in IDS for j in IDS if i != j]
    assert draws != [Links(0.3, seed=1).lost(r, i, j) for r in range(1, 400) for i in IDS for j in IDS if i != j]


def test_push_sum_under_drops_still_brings_the_models_together() -> None:
    ids = tuple(f"p{i}" for i in range(6))
    g = Gossip(topology="epidemic", fanout=2, mixing="push_sum", ctx=RunContext(client_ids=ids))
    peers = {c: PeerState({KEY: torch.tensor([[float(k)]])}) for k, c in enumerate(ids)}
    links = Links(0.2, seed=1)
    for r in range(1, 120):
        peers, _, _ = exchange(g, r, peers, links=links)
    z = [peers[c].model()[KEY].item() for c in ids]
    assert max(z) - min(z) < 1e-3  # consensus (on a weighted average: lost mass is not replaced)
    assert 0.0 < min(z) and max(z) < 5.0


def test_a_server_strategy_refuses_link_drop(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sampling.link_drop = 0.1.*has a server.*use one of: .*gossip"):
        tiny_cfg("sampling.link_drop=0.1")
    assert tiny_cfg("sampling.link_drop=0.1", "strategy.name=gossip").sampling.link_drop == 0.1


def test_a_rejoining_peer_fetches_a_neighbours_model() -> None:
    """rejoin: fetch: a peer absent from the previous round starts from its first neighbour that
    took part (a counted message); the others from their own; push-sum refuses it by name."""
    from fedtune.peer_sampling import Roles
    from fedtune.recipes.decentralized import fetch

    ids = ("a", "b", "c", "d")  # ring a-b-c-d-a
    g = Gossip(topology="ring", rejoin="fetch", ctx=RunContext(client_ids=ids))
    previous = Roles(("b", "c"), ("b", "c"))  # a and d were offline
    sources = g.sources(2, ids, previous)
    assert sources == {"a": "b", "b": "b", "c": "c", "d": "c"}
    held = {c: PeerState({KEY: torch.tensor([[float(k)]])}) for k, c in enumerate(ids)}
    own, moved = fetch(g, sources, held)
    assert own["a"].x[KEY].item() == 1.0 and own["d"].x[KEY].item() == 2.0 and own["b"] is held["b"]
    size = len(serialize({KEY: torch.zeros(1, 1)}))
    assert moved == {"b": {"bytes_up": size, "bytes_down": 0}, "a": {"bytes_up": 0, "bytes_down": size},
                     "c": {"bytes_up": size, "bytes_down": 0}, "d": {"bytes_up": 0, "bytes_down": size}}  # fmt: skip
    assert Gossip(topology="ring", ctx=RunContext(client_ids=ids)).sources(2, ids, previous) == {c: c for c in ids}
    pushed = Gossip(topology="ring", rejoin="fetch", mixing="push_sum", ctx=RunContext(client_ids=ids))
    assert [p.field for p in pushed.network_problems(list(ids), 0)] == ["strategy.rejoin"]

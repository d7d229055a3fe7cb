"""MoDeST (arXiv:2302.13837) on the serverless loop's pieces: every peer computes the same
trainers and aggregators; trainers fetch from the previous round's aggregators; the aggregators'
average and the messages equal their hand computations; too few models leave the aggregators as
they were."""

import hashlib

import pytest
import torch

from fedtune.client.run import PeerState
from fedtune.codecs import serialize
from fedtune.peer_sampling import ModestSampler, Roles
from fedtune.recipes.decentralized import exchange, fetch
from fedtune.strategies.base import RunContext
from fedtune.strategies.modest import MoDeST

KEY = "m.lora_B.weight"
PEERS = [f"p{i}" for i in range(12)]


def at(v: float) -> PeerState:
    return PeerState({KEY: torch.tensor([[v, -v]])})


SIZE = len(serialize({KEY: torch.zeros(1, 2)}))


def rank(seed: int, role: str, rnd: int, peer: str) -> int:
    h = hashlib.sha256(repr((seed, "peer-role", role, rnd, peer)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def test_every_peer_computes_the_same_trainers_and_aggregators() -> None:
    sampler = MoDeST(trainers=4, aggregators=2, ctx=RunContext(seed=5)).sampler(1.0, 1, "fixed")
    for rnd in (1, 2, 3):
        views = [PEERS, PEERS[::-1], PEERS[5:] + PEERS[:5]]  # the same membership, listed by each peer
        (roles,) = {sampler.roles(rnd, v) for v in views}
        assert roles.trainers == tuple(sorted(sorted(PEERS, key=lambda p: rank(5, "train", rnd, p))[:4]))
        assert roles.mixers == tuple(sorted(sorted(PEERS, key=lambda p: rank(5, "aggregate", rnd, p))[:2]))
    assert ModestSampler(4, 2, 5).roles(1, PEERS) != ModestSampler(4, 2, 5).roles(2, PEERS)


def test_aggregators_average_the_trainers_models_by_hand() -> None:
    """Trainers t1, t2, t3 at 1, 2, 6; aggregators a1, a2 (held at 0): each ends at (1 + 2 + 6) / 3
    = 3; 3 x 2 messages; the trainers keep their own models (they do not receive)."""
    m = MoDeST(trainers=3, aggregators=2)
    roles = Roles(("t1", "t2", "t3"), ("a1", "a2"))
    trained = {"t1": at(1.0), "t2": at(2.0), "t3": at(6.0)}
    mixed, per_peer, metrics = exchange(m, 1, trained, roles, {"a1": at(0.0), "a2": at(0.0)})
    assert sorted(mixed) == ["a1", "a2"]
    for a in ("a1", "a2"):
        torch.testing.assert_close(mixed[a].x[KEY], torch.tensor([[3.0, -3.0]]))
    assert metrics["gossip_messages"] == 6 and metrics["aggregated"] == 1
    assert metrics["consensus_distance"] == pytest.approx(0.0)
    assert per_peer["t1"] == {"bytes_up": 2 * SIZE, "bytes_down": 0}
    assert per_peer["a1"] == {"bytes_up": 0, "bytes_down": 3 * SIZE}


def test_a_trainer_that_also_aggregates_averages_its_own_model_without_sending_it() -> None:
    m = MoDeST(trainers=3, aggregators=1)
    trained = {"t1": at(1.0), "t2": at(2.0), "t3": at(6.0)}
    mixed, per_peer, metrics = exchange(m, 1, trained, Roles(("t1", "t2", "t3"), ("t1",)))
    torch.testing.assert_close(mixed["t1"].x[KEY], torch.tensor([[3.0, -3.0]]))
    assert metrics["gossip_messages"] == 2 and per_peer["t1"]["bytes_down"] == 2 * SIZE


@pytest.mark.parametrize(("fraction", "expect"), [(1.0, None), (0.5, 1.5)])
def test_the_success_fraction_decides_whether_the_aggregators_average(fraction: float, expect) -> None:
    """3 trainers sampled, 2 replied: with success_fraction 1 (3 needed) nothing is averaged; with
    0.5 (ceil(1.5) = 2 needed) the aggregator holds (1 + 2) / 2."""
    m = MoDeST(trainers=3, aggregators=1, success_fraction=fraction)
    roles = Roles(("t1", "t2", "t3"), ("a",))
    mixed, _, metrics = exchange(m, 1, {"t1": at(1.0), "t2": at(2.0)}, roles, {"a": at(9.0)})
    if expect is None:
        assert mixed == {} and metrics["aggregated"] == 0 and metrics["gossip_messages"] == 0
    else:
        assert mixed["a"].x[KEY][0, 0].item() == pytest.approx(expect) and metrics["aggregated"] == 1


def test_trainers_fetch_the_last_aggregate_spread_over_the_aggregators() -> None:
    m = MoDeST(trainers=3, aggregators=2)
    assert m.sources(1, ["t1", "t2", "t3"], None) == {"t1": "t1", "t2": "t2", "t3": "t3"}
    sources = m.sources(2, ["t3", "t1", "t2"], Roles(("x",), ("a1", "a2")))
    assert sources == {"t1": "a1", "t2": "a2", "t3": "a1"}
    held = {"a1": at(3.0), "a2": at(3.0), "t1": at(0.0), "t2": at(0.0), "t3": at(7.0)}
    own, moved = fetch(m, sources, held)
    assert all(own[t].x[KEY][0, 0].item() == 3.0 for t in ("t1", "t2", "t3"))
    assert moved["a1"] == {"bytes_up": 2 * SIZE, "bytes_down": 0} and moved["t3"]["bytes_down"] == SIZE


def test_impossible_samples_are_named() -> None:
    problems = MoDeST(trainers=5, aggregators=0, success_fraction=1.5).network_problems(["a", "b", "c"], 0)
    assert [p.field for p in problems] == ["strategy.trainers", "strategy.aggregators", "strategy.success_fraction"]


def test_a_sampling_section_modest_would_ignore_is_refused_by_name() -> None:
    """MoDeST sizes its rounds with strategy.trainers / aggregators: a sampling.fraction or
    min_clients it would silently ignore is a validation problem naming the field."""
    from fedtune.components import check_strategy
    from fedtune.config import ExperimentConfig

    def fields(**sampling: float) -> list[str]:
        cfg = ExperimentConfig.model_validate(
            {"name": "m", "strategy": {"name": "modest", "trainers": 2}, "sampling": sampling}
        )
        return [p.field for p in check_strategy(cfg)]

    assert fields() == []
    assert fields(fraction=0.5) == ["sampling.fraction"]
    assert fields(min_clients=3) == ["sampling.min_clients"]

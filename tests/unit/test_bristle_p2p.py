"""Bristle without a server (`bristle_p2p`): the prioritiser keeps the nearest senders plus a
seeded few, the integrator's trust and a receiver's trust-scaled row equal their hand
computations, and a Byzantine sender that scores badly on the receiver's data gets no weight
while the honest ones are mixed as gossip mixes them."""

import math

import pytest
import torch

from fedtune.client.run import PeerState
from fedtune.recipes.decentralized import exchange
from fedtune.strategies.base import RunContext
from fedtune.strategies.bristle_p2p import BristleP2P, prioritise, trust, trusted_row

KEY = "m.lora_B.weight"


def at(value: float) -> PeerState:
    return PeerState({KEY: torch.tensor([[value]])})


class Scorer:
    """A receiver's loss of a model on its data: (x - 1)^2 + 2 (an honest model sits near 1)."""

    def __init__(self) -> None:
        self.asked: dict[str, list[str]] = {}

    def receiver_losses(self, wanted):
        self.asked = {j: sorted(m) for j, m in wanted.items()}
        return {j: {i: (float(s[KEY]) - 1.0) ** 2 + 2.0 for i, s in m.items()} for j, m in wanted.items()}


def test_trust_by_hand() -> None:
    assert trust(2.0, 1.5, 0.2) == 1.0  # better than its own: full trust
    assert trust(2.0, 2.2, 0.2) == pytest.approx(0.5)  # 10 % worse at tolerance 20 %: 1 - 0.2 / 0.4
    assert trust(2.0, 2.5, 0.2) == 0.0 and trust(2.0, math.inf, 0.2) == 0.0


def test_a_trusted_row_puts_the_removed_weight_on_the_diagonal_by_hand() -> None:
    coef = {"a": 0.4, "b": 0.2, "c": 0.2, "d": 0.2}
    losses = {"a": 2.0, "b": 2.0, "c": 2.2, "d": 50.0}  # d is not even close; e was never scored
    row = trusted_row("a", {**coef, "e": 0.0}, losses, 0.2)
    assert row == pytest.approx({"a": 0.4 + 0.1 + 0.2, "b": 0.2, "c": 0.1, "d": 0.0, "e": 0.0})


def test_the_prioritiser_keeps_the_nearest_plus_seeded_explorers() -> None:
    dist = {"b": 1.0, "c": 3.0, "d": 2.0, "e": 2.0}
    assert prioritise(dist, None, 0, []) == ["b", "c", "d", "e"]
    assert prioritise(dist, 2, 0, [0, 1, 2, 3]) == ["b", "d"]  # ties by id
    # the rest in distance order is [e, c]; the permutation's first index below 2 is 1: c
    assert prioritise(dist, 2, 1, [3, 1, 0, 2]) == ["b", "c", "d"]


def test_a_byzantine_neighbour_gets_no_weight_and_the_honest_mix_is_gossips() -> None:
    # complete graph on 4 peers: Metropolis weights 1/4 everywhere; d sends a wild model
    b = BristleP2P(topology="complete", tolerance=0.2, ctx=RunContext(client_ids=("a", "b", "c", "d")))
    trained = {"a": at(1.0), "b": at(1.2), "c": at(0.8), "d": at(100.0)}
    scorer = Scorer()
    mixed, per_peer, metrics = exchange(b, 1, trained, scorer=scorer)
    assert scorer.asked["a"] == ["a", "b", "c", "d"]  # keep None: every sender is scored
    # a: losses 2, 2.04, 2.04 (trust 1 - 0.04 / 0.4 = 0.9 each), d: 0 -> row a 0.55, b 0.225, c 0.225
    assert mixed["a"].x[KEY].item() == pytest.approx(0.55 * 1.0 + 0.225 * 1.2 + 0.225 * 0.8)
    assert all(abs(mixed[j].x[KEY].item() - 1.0) < 0.25 for j in "abc")  # gossip would give ~25.75
    assert metrics["gossip_messages"] == 12  # every message still arrives (and is counted)


def test_keep_scores_only_the_nearest_and_an_unscored_sender_is_not_mixed() -> None:
    b = BristleP2P(topology="complete", keep=1, ctx=RunContext(client_ids=("a", "b", "c")))
    trained = {"a": at(1.0), "b": at(1.1), "c": at(0.5)}
    scorer = Scorer()
    mixed, _, _ = exchange(b, 1, trained, scorer=scorer)
    assert scorer.asked["a"] == ["a", "b"]  # b is a's nearest
    # a: b's loss 2.01 vs 2: trust 1 - 0.01 / 0.4 = 0.975, weight 1/3 * 0.975; c unscored: 0
    w = 0.975 / 3
    assert mixed["a"].x[KEY].item() == pytest.approx((1 - w) * 1.0 + w * 1.1)


def test_bristle_p2p_needs_scoring_and_refuses_what_it_cannot_do(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    b = BristleP2P(topology="complete", ctx=RunContext(client_ids=("a", "b")))
    with pytest.raises(ValueError, match="needs the engine's scoring"):
        exchange(b, 1, {"a": at(1.0), "b": at(2.0)})
    with pytest.raises(ConfigError, match="has no server"):
        tiny_cfg("strategy.name=bristle_p2p", "engine.name=flower-sim")
    problems = BristleP2P(topology="epidemic", mixing="push_sum").network_problems(["a", "b", "c"], 0)
    assert [p.field for p in problems] == ["strategy.mixing"]

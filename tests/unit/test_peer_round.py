"""A peer process's row when messages are missing uses the simulator's rule
(`recipes/decentralized.py::delivered`): the row still sums to one, an absent sender's weight
stays on the peer's own coefficient, and under push-sum the lost share is lost."""

import pytest

from fedtune.recipes.decentralized import delivered


def test_a_missing_senders_weight_stays_on_the_diagonal() -> None:
    out = delivered({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, "a", {"c"}, False)
    assert out == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert sum(out.values()) == pytest.approx(1.0)


def test_under_push_sum_the_lost_share_is_lost() -> None:
    assert delivered({"a": 0.5, "b": 0.5}, "a", {"b"}, True) == {"a": 0.5}

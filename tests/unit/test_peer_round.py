"""A peer's own row when messages are missing (`recipes/peer.py::keep_on_diagonal`): the row
still sums to one, an absent sender's weight stays on the peer's own coefficient (as the
simulator keeps an absent neighbour's weight on the diagonal), and a row without the peer
(an aggregator that did not train) is renormalized over the senders that arrived."""

import pytest

from fedtune.recipes.peer import keep_on_diagonal


def test_a_missing_senders_weight_stays_on_the_diagonal() -> None:
    row = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    out = keep_on_diagonal(row, ["c"], "a")
    assert out == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert sum(out.values()) == pytest.approx(1.0)


def test_nothing_missing_keeps_the_row() -> None:
    row = {"a": 0.5, "b": 0.5}
    assert keep_on_diagonal(row, [], "a") == row


def test_a_row_without_me_is_renormalized_over_what_arrived() -> None:
    out = keep_on_diagonal({"b": 0.25, "c": 0.25, "d": 0.5}, ["d"], "a")
    assert out == pytest.approx({"b": 0.5, "c": 0.5})

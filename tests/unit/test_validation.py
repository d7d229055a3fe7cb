"""Every invalid update is rejected with a reason and recorded, never aggregated."""

import pytest
import torch

from fedtune.types import ClientUpdate
from fedtune.validation import screen, update_problem

EXPECTED = {"m.lora_A.weight": torch.Size([2, 4]), "m.lora_B.weight": torch.Size([4, 2])}


def upd(delta: dict, n: int = 5, up: int = 100) -> ClientUpdate:
    return ClientUpdate("c", delta, n, {}, up, 50)


def good() -> dict:
    return {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.ones(4, 2)}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.update({"m.lora_A.weight": torch.full((2, 4), float("nan"))}), "NaN or Inf"),
        (lambda d: d.update({"m.lora_B.weight": torch.full((4, 2), float("inf"))}), "NaN or Inf"),
        (lambda d: d.update({"x.lora_A.weight": torch.zeros(1)}), "unknown keys"),
        (lambda d: d.pop("m.lora_B.weight"), "missing keys"),
        (lambda d: d.update({"m.lora_A.weight": torch.zeros(4, 2)}), "has shape"),
        (lambda d: d.update({"m.lora_A.weight": torch.zeros(2, 4, dtype=torch.int32)}), "dtype"),
    ],
)
def test_each_invalid_update_is_rejected(change, reason: str) -> None:
    d = good()
    change(d)
    assert reason in update_problem(upd(d), EXPECTED, None)


def test_oversized_and_valid_updates() -> None:
    assert "exceeds" in update_problem(upd(good(), up=2_000_001), EXPECTED, 2_000_000)
    assert update_problem(upd(good(), up=2_000_000), EXPECTED, 2_000_000) is None
    assert update_problem(upd({"fedkseed.g": torch.ones(3)}), None, None) is None  # a strategy's own payload
    ok, bad = screen(
        [upd(good()), ClientUpdate("d", {"m.lora_A.weight": torch.zeros(2, 4)}, 5, {}, 70, 50)],
        {"c": {}, "d": {}},
        lambda sent: EXPECTED,
        None,
    )
    assert [u.client_id for u in ok] == ["c"]
    assert bad[0].client_id == "d" and bad[0].reason.startswith("rejected: missing keys") and bad[0].bytes_up == 70

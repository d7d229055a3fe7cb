"""Pairwise masks cancel exactly in the sum; a single masked upload reveals nothing useful;
non-sum strategies are refused."""

import pytest
import torch

from fedtune.secagg import FRAC, mask, to_fixed, unmask_sum


def test_masks_cancel_exactly_in_the_sum() -> None:
    g = torch.Generator().manual_seed(0)
    ids = ["a", "b", "c", "d"]
    deltas = {c: {"m.lora_B.weight": torch.randn(6, 3, generator=g)} for c in ids}
    weights = {"a": 3.0, "b": 1.0, "c": 7.0, "d": 2.0}
    fixed = {c: to_fixed(deltas[c], weights[c]) for c in ids}
    masked = {c: mask(fixed[c], c, ids, seed=5, rnd=2) for c in ids}
    exact = sum(fixed[c]["m.lora_B.weight"] for c in ids)
    assert torch.equal(sum(masked[c]["m.lora_B.weight"] for c in ids), exact)  # int64: bit-exact
    # one upload alone is far from the client's value (the mask dominates)
    assert float((masked["a"]["m.lora_B.weight"] - fixed["a"]["m.lora_B.weight"]).abs().min()) > 2**40
    want = sum(weights[c] * deltas[c]["m.lora_B.weight"] for c in ids)
    got = unmask_sum(list(masked.values()))["m.lora_B.weight"]
    assert float((got - want).abs().max()) <= len(ids) / 2 ** (FRAC + 1) + 1e-6
    # masks of another round or a different participant set do not cancel
    other = mask(fixed["a"], "a", ids, seed=5, rnd=3)
    assert not torch.equal(other["m.lora_B.weight"] + sum(masked[c]["m.lora_B.weight"] for c in "bcd"), exact)


def test_secure_aggregation_is_refused_for_non_sum_strategies(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    for name in ("flora", "pcl", "robust"):
        with pytest.raises(ConfigError, match="secure_aggregation"):
            tiny_cfg("secure_aggregation=true", f"strategy.name={name}")
    # DP-FedAvg clips on the clients and works with secure aggregation, but not with adaptive
    # clipping, which needs each client's clipped bit in the clear
    tiny_cfg("secure_aggregation=true", "strategy.name=dp_fedavg")
    with pytest.raises(ConfigError, match="strategy.adaptive"):
        tiny_cfg("secure_aggregation=true", "strategy.name=dp_fedavg", "strategy.adaptive=true")

"""Each robust aggregator ignores (or bounds) f planted outliers in a constructed case; attacks
transform updates as specified."""

import pytest
import torch

from fedtune.engines.faults import attackers, corrupt_shard, poison
from fedtune.strategies.base import RunContext
from fedtune.strategies.robust import Robust, robust_mean
from fedtune.types import ClientUpdate


def planted(n: int = 10, f: int = 3, d: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    honest = mu + 0.05 * torch.randn(n - f, d, generator=g, dtype=torch.float64)
    bad = -10 * mu + 0.05 * torch.randn(f, d, generator=g, dtype=torch.float64)  # sign flip x10
    return torch.cat([honest, bad]), honest.mean(0)


@pytest.mark.parametrize("rule", ["krum", "multikrum", "median", "trimmed_mean"])
def test_robust_rules_ignore_planted_outliers(rule: str) -> None:
    x, honest = planted()
    w = torch.full((10,), 0.1, dtype=torch.float64)
    agg, kept = robust_mean(x, rule, f=3, trim=0.3, max_norm=None, w=w)
    assert float((agg - honest).norm()) < 0.1 * float(honest.norm())
    if rule in ("krum", "multikrum"):
        assert all(i < 7 for i in kept) and len(kept) == (1 if rule == "krum" else 7)
    plain, _ = robust_mean(x, "mean", 3, 0.3, None, w)
    assert float((plain - honest).norm()) > 2 * float(honest.norm())  # what the attack does to FedAvg


def test_norm_bounding_bounds_the_attackers_influence() -> None:
    x, honest = planted()
    w = torch.full((10,), 0.1, dtype=torch.float64)
    agg, _ = robust_mean(x, "norm_bound", 3, 0.0, None, w)
    bound = float(x.norm(dim=1).median())
    # each attacker moves the mean by at most w_i * (bound + |honest|)
    assert float((agg - 0.7 * honest).norm()) <= 0.3 * (bound + float(honest.norm())) + 1e-6
    plain, _ = robust_mean(x, "mean", 3, 0.0, None, w)
    assert float((agg - honest).norm()) < 0.5 * float((plain - honest).norm())


def test_robust_in_dw_space_returns_a_rank_r_lora_of_the_honest_update() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, generator=g)
    glob = {"m.lora_A.weight": a, "m.lora_B.weight": torch.zeros(5, 2)}
    db = torch.randn(5, 2, generator=g)
    ups = [ClientUpdate(c, {"m.lora_B.weight": db.clone()}, 1, {}, 0, 0) for c in "abcd"]
    ups.append(ClientUpdate("z", {"m.lora_B.weight": -50 * db}, 1, {}, 0, 0))
    s = Robust(rule="median", space="dw", ctx=RunContext(lora_scale=2.0))
    res = s.aggregate(1, ups, s.init_state(glob))
    new = res.global_state
    got = 2.0 * new["m.lora_B.weight"] @ new["m.lora_A.weight"]
    want = 2.0 * db @ a  # every coordinate's median is the honest value
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert res.metrics["robust_kept"] == list("abcdz")


def test_attacks_transform_updates_and_data() -> None:
    from fedtune.data.blocks import Shard

    d = {"k": torch.ones(3), "i": torch.arange(3)}
    assert torch.equal(poison(d, "sign_flip", 4.0, torch.Generator())["k"], -4 * torch.ones(3))
    assert torch.equal(poison(d, "scale", 10.0, torch.Generator())["k"], 10 * torch.ones(3))
    noisy = poison(d, "gaussian", 2.0, torch.Generator().manual_seed(0))["k"]
    assert not torch.equal(noisy, d["k"]) and torch.equal(poison(d, "sign_flip", 1, torch.Generator())["i"], d["i"])
    ids = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    assert len(attackers(ids, 0.3, 0)) == 3 and attackers(ids, 0.3, 0) == attackers(ids, 0.3, 0)
    sh = Shard("a", torch.arange(40).reshape(4, 10), torch.zeros(0, 10), torch.zeros(0, 10), 1)
    bad = corrupt_shard(sh, 0)
    assert bad.train.shape == sh.train.shape and not torch.equal(bad.train, sh.train) and int(bad.train.max()) < 40


def test_bristle_integrator_weights_follow_per_domain_gains() -> None:
    from fedtune.strategies.robust import integrator_weights

    base = {"a": 3.0, "b": 2.0}
    cands = [
        {"a": 2.0, "b": 2.0},  # helps a by 1
        {"a": 2.5, "b": 1.5},  # helps a by 0.5, b by 0.5
        {"a": 4.0, "b": 3.0},  # hurts both: weight 0
    ]
    w = integrator_weights(base, cands)
    # domain a: gains 1, 0.5, 0 -> 2/3, 1/3, 0; domain b: 0, 0.5, 0 -> 0, 1, 0; mean over domains
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert float(integrator_weights(base, [{"a": 3.5, "b": 2.5}]).sum()) == 0.0  # nobody helps: no move


def test_krum_and_trimmed_mean_refuse_samples_they_cannot_handle(tiny_cfg) -> None:
    """The landed code ran Krum with n = 4 < 2f + 3 (with f = 2 it kept an attacker) and a
    trimmed mean that trims nothing, without a word. Now: refused for the configured sample size,
    and a round that dropouts shrink below it keeps the model and says why."""
    from fedtune import components
    from fedtune.errors import ConfigError

    ids = ["email", "http", "json", "logging"]
    krum = tiny_cfg("strategy.name=robust", "strategy.rule=krum", "strategy.f=1")
    assert any("2f + 3 = 5" in p.constraint for p in components.per_client_problems(krum, ids))
    trim = tiny_cfg("strategy.name=robust", "strategy.rule=trimmed_mean", "strategy.trim=0.2")
    assert any("removes nothing" in p.constraint for p in components.per_client_problems(trim, ids))
    assert components.per_client_problems(tiny_cfg("strategy.name=robust", "strategy.rule=median"), ids) == []
    with pytest.raises(ConfigError, match="2f \\+ 3"):
        from fedtune.engines.federation import rank_per_client

        rank_per_client(krum, ids)  # what the in-process federation checks before the model loads
    s = Robust(rule="multikrum", f=1)
    glob = {"m.lora_B.weight": torch.zeros(2, 2)}
    ups = [ClientUpdate(c, {"m.lora_B.weight": torch.ones(2, 2)}, 1) for c in "abcd"]  # 4 < 5 arrived
    res = s.aggregate(1, ups, s.init_state(glob))
    assert "n >= 2f + 3" in res.metrics["skipped"] and torch.equal(
        res.global_state["m.lora_B.weight"], glob["m.lora_B.weight"]
    )

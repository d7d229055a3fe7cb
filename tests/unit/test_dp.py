"""DP-FedAvg: clipping bound, noise scale, the accountant's epsilon, adaptive clipping, target epsilon."""

import math

import pytest
import torch

pytest.importorskip("dp_accounting", reason="needs the dp extra (make test installs it)")

from fedtune.strategies.dp import DPFedAvg, effective_sigma, epsilon, norm  # noqa: E402
from fedtune.types import ClientUpdate  # noqa: E402

KEY = "m.lora_B.weight"


def upd(cid: str, v: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(cid, {KEY: v}, 1, {}, 0, 0)


def test_clipped_updates_never_exceed_s_and_the_mean_is_exact_without_noise_leverage() -> None:
    s = DPFedAvg(clip=1.0, noise_multiplier=1e-9, sampling_rate=1.0)  # noise negligible
    state = s.init_state({KEY: torch.zeros(4, 4)})
    g = torch.Generator().manual_seed(0)
    big = [upd(c, 10 * torch.randn(4, 4, generator=g)) for c in "abc"]
    small = upd("d", torch.full((4, 4), 0.01))
    new, st = s.aggregate(1, [*big, small], state)
    clipped = [u.delta[KEY] * min(1.0, 1.0 / norm(u.delta)) for u in [*big, small]]
    assert all(norm({KEY: c}) <= 1.0 + 1e-6 for c in clipped)
    torch.testing.assert_close(new[KEY], sum(clipped) / 4, atol=1e-6, rtol=0)
    assert st["round_metrics"]["dp_clipped_fraction"] == 0.75


@pytest.mark.parametrize("mode", ["server", "distributed"])
def test_noise_standard_deviation_is_sigma_times_s(mode: str) -> None:
    s = DPFedAvg(clip=0.5, noise_multiplier=1.3, noise=mode, sampling_rate=1.0)
    zeros = {KEY: torch.zeros(200, 200)}
    new, _ = s.aggregate(1, [upd(c, zeros[KEY]) for c in "abcd"], s.init_state(zeros))
    noise_on_sum = new[KEY] * 4
    assert float(noise_on_sum.std()) == pytest.approx(1.3 * 0.5, rel=0.02)
    assert abs(float(noise_on_sum.mean())) < 0.01


def test_epsilon_is_the_libraries_value_for_the_same_mechanism() -> None:
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    for _ in range(5):  # five separate compositions instead of one self-composed event
        acc.compose(dpa.PoissonSampledDpEvent(0.25, dpa.GaussianDpEvent(1.1)))
    assert epsilon(0.25, 1.1, 5, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(0.25, 1.1, 5, 1e-5) < epsilon(0.25, 1.1, 10, 1e-5) < epsilon(1.0, 1.1, 10, 1e-5)
    assert effective_sigma(1.0, 10.0) == pytest.approx((1 - 1 / 400) ** -0.5)


def test_adaptive_clipping_moves_s_towards_the_target_quantile_and_target_epsilon_stops() -> None:
    s = DPFedAvg(clip=0.1, noise_multiplier=2.0, adaptive=True, clip_lr=0.5, count_noise=1.5, sampling_rate=1.0)
    state = s.init_state({KEY: torch.zeros(3)})
    ups = [upd(c, torch.full((3,), 5.0)) for c in "abcdefgh"]  # every norm is above S
    _, state = s.aggregate(1, ups, state)
    assert 0.1 < state["clip"] < 0.1 * math.exp(0.5 * (0.5 + 3 * 1.5 / 8))  # b ~ 0 (+ noise) -> S grows
    with pytest.raises(ValueError, match="must exceed"):
        effective_sigma(2.0, 0.9)
    eps1 = epsilon(1.0, 2.0, 1, 1e-5)
    target = DPFedAvg(clip=0.1, noise_multiplier=2.0, target_epsilon=eps1 * 1.05, sampling_rate=1.0)
    _, st = target.aggregate(1, ups, target.init_state({KEY: torch.zeros(3)}))
    assert "target_epsilon" in st["round_metrics"]["stop"]

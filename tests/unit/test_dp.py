"""DP-FedAvg: clipping bound, noise scale, the accountant's epsilon for the mechanism as run
(adaptive clipping's two Gaussians, the real sampling rate and scheme), target epsilon."""

import math

import pytest
import torch

pytest.importorskip("dp_accounting", reason="needs the dp extra (make test installs it)")

import dp_accounting as dpa  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from fedtune.privacy.accounting import Sampling, adaptive_value_sigma, epsilon_of  # noqa: E402
from fedtune.strategies.base import RunContext  # noqa: E402
from fedtune.strategies.dp import DPFedAvg, epsilon, norm  # noqa: E402
from fedtune.types import ClientUpdate  # noqa: E402

KEY = "m.lora_B.weight"


def upd(cid: str, v: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(cid, {KEY: v}, 1, {}, 0, 0)


def rdp(event, steps: int, delta: float = 1e-5, relation=None) -> float:
    acc = RdpAccountant(neighboring_relation=relation) if relation else RdpAccountant()
    for _ in range(steps):  # separate compositions instead of one self-composed event
        acc.compose(event)
    return float(acc.get_epsilon(delta))


def test_clipped_updates_never_exceed_s_and_the_mean_is_exact_without_noise_leverage() -> None:
    s = DPFedAvg(clip=1.0, noise_multiplier=1e-9)  # noise negligible
    state = s.init_state({KEY: torch.zeros(4, 4)})
    g = torch.Generator().manual_seed(0)
    big = [upd(c, 10 * torch.randn(4, 4, generator=g)) for c in "abc"]
    small = upd("d", torch.full((4, 4), 0.01))
    res = s.aggregate(1, [*big, small], state)
    clipped = [u.delta[KEY] * min(1.0, 1.0 / norm(u.delta)) for u in [*big, small]]
    assert all(norm({KEY: c}) <= 1.0 + 1e-6 for c in clipped)
    torch.testing.assert_close(res.global_state[KEY], sum(clipped) / 4, atol=1e-6, rtol=0)
    assert "round_metrics" not in res.state  # metrics are returned, never kept as strategy state


@pytest.mark.parametrize("mode", ["server", "distributed"])
def test_noise_standard_deviation_is_sigma_times_s(mode: str) -> None:
    s = DPFedAvg(clip=0.5, noise_multiplier=1.3, noise=mode)
    zeros = {KEY: torch.zeros(200, 200)}
    new = s.aggregate(1, [upd(c, zeros[KEY]) for c in "abcd"], s.init_state(zeros)).global_state
    noise_on_sum = new[KEY] * 4
    assert float(noise_on_sum.std()) == pytest.approx(1.3 * 0.5, rel=0.02)
    assert abs(float(noise_on_sum.mean())) < 0.01


def test_epsilon_is_the_libraries_value_for_the_same_mechanism() -> None:
    ref = rdp(dpa.PoissonSampledDpEvent(0.25, dpa.GaussianDpEvent(1.1)), 5)
    assert epsilon(0.25, 1.1, 5, 1e-5) == pytest.approx(ref, rel=1e-9)
    assert epsilon(0.25, 1.1, 5, 1e-5) < epsilon(0.25, 1.1, 10, 1e-5) < epsilon(1.0, 1.1, 10, 1e-5)


def test_adaptive_clipping_adds_value_noise_z_delta_and_accounts_both_gaussians() -> None:
    """Andrew et al.: total multiplier z = 1.0 with count noise sigma_b = 2 needs value noise
    z_delta = (1 - 1/16)^-1/2 = 1.0328 (more than z), and the epsilon is that of the composed value
    and count Gaussians (multipliers z_delta and 2 sigma_b), which is the epsilon of one Gaussian
    at z, and above the epsilon of the value noise alone. The landed code reported the epsilon of
    (z^-2 - (2 sigma_b)^-2)^-1/2 applied to noise of only z."""
    z, cs, clip = 1.0, 2.0, 0.5
    assert adaptive_value_sigma(z, cs) == pytest.approx((1 - 1 / 16) ** -0.5)
    s = DPFedAvg(clip=clip, noise_multiplier=z, adaptive=True, count_noise=cs)
    zeros = {KEY: torch.zeros(300, 300)}
    res = s.aggregate(1, [upd(c, zeros[KEY]) for c in "abcd"], s.init_state(zeros))
    noise_on_sum = res.global_state[KEY] * 4
    assert float(noise_on_sum.std()) == pytest.approx(adaptive_value_sigma(z, cs) * clip, rel=0.02)
    both = dpa.ComposedDpEvent([dpa.GaussianDpEvent(adaptive_value_sigma(z, cs)), dpa.GaussianDpEvent(2 * cs)])
    assert res.metrics["epsilon"] == pytest.approx(rdp(both, 1), rel=1e-9)
    assert res.metrics["epsilon"] == pytest.approx(rdp(dpa.GaussianDpEvent(z), 1), rel=1e-3)
    assert res.metrics["epsilon"] >= rdp(dpa.GaussianDpEvent(adaptive_value_sigma(z, cs)), 1)


def test_adaptive_clipping_releases_only_the_noised_count() -> None:
    s = DPFedAvg(clip=0.1, noise_multiplier=2.0, adaptive=True, clip_lr=0.5, count_noise=1.5)
    state = s.init_state({KEY: torch.zeros(3)})
    ups = [upd(c, torch.full((3,), 5.0)) for c in "abcdefgh"]  # every norm is above S
    res = s.aggregate(1, ups, state)
    assert "dp_clipped_fraction" not in res.metrics  # the exact count is what adaptive clipping must noise
    noisy = res.metrics["dp_noisy_clipped_fraction"]
    assert noisy != 1.0  # noised: not the true fraction 1.0
    b = 1.0 - noisy  # what the update of S used: S grows since b < target quantile
    assert res.state["clip"] == pytest.approx(0.1 * math.exp(-0.5 * (b - 0.5)))
    with pytest.raises(ValueError, match="must exceed"):
        adaptive_value_sigma(2.0, 0.9)


def test_target_epsilon_stops() -> None:
    ups = [upd(c, torch.full((3,), 5.0)) for c in "abcd"]
    eps1 = epsilon(1.0, 2.0, 1, 1e-5)
    target = DPFedAvg(clip=0.1, noise_multiplier=2.0, target_epsilon=eps1 * 1.05)
    res = target.aggregate(1, ups, target.init_state({KEY: torch.zeros(3)}))
    assert res.stop is not None and "target_epsilon" in res.stop


def test_the_accountant_uses_the_rate_and_scheme_actually_sampled() -> None:
    """n = 4 clients, fraction 0.1: k = max(min_clients=1, round(0.4)) = 1 client per round, so
    the rate is 1/4, not 0.1 (the landed code reported 7.9 instead of about 20)."""
    from fedtune import components
    from fedtune.config import load_config

    cfg = load_config(None, ["sampling.fraction=0.1", "strategy.name=dp_fedavg", "strategy.noise_multiplier=1.0"])
    ctx = components.run_context(cfg, ["a", "b", "c", "d"], 1.0)
    assert (ctx.sampling_rate, ctx.sample_size, ctx.sampling_scheme) == (0.25, 1, "fixed")
    s = DPFedAvg(noise_multiplier=1.0, clip=0.1, ctx=ctx)
    res = s.aggregate(1, [upd("a", torch.ones(3))], s.init_state({KEY: torch.zeros(3)}))
    # replace-one: the clipped sum's sensitivity is 2S, so dp-accounting's RDP path gets sigma / 2
    fixed = dpa.SampledWithoutReplacementDpEvent(4, 1, dpa.GaussianDpEvent(0.5))
    assert res.metrics["epsilon"] == pytest.approx(rdp(fixed, 1, relation=dpa.NeighboringRelation.REPLACE_ONE))
    assert "without replacement, 1 of 4" in res.metrics["dp_accounting"]
    assert res.metrics["epsilon"] > epsilon(0.1, 1.0, 1, 1e-5)  # what the landed code reported
    poisson = components.run_context(
        cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"scheme": "poisson"})}),
        ["a", "b", "c", "d"],
        1.0,
    )
    assert poisson.sampling_rate == 0.1
    p = DPFedAvg(noise_multiplier=1.0, clip=0.1, ctx=poisson)
    res = p.aggregate(1, [upd("a", torch.ones(3))], p.init_state({KEY: torch.zeros(3)}))
    assert res.metrics["epsilon"] == pytest.approx(epsilon_of(Sampling("poisson", 0.1), [1.0], 1, 1e-5))
    assert RunContext().sampling_rate == 1.0


def test_poisson_sampling_divides_the_noised_sum_by_the_expected_count() -> None:
    """With Poisson sampling the number of clients drawn depends on who is in the data: the mean
    uses q N (here 0.5 x 4 = 2), whatever the draw (3 arrived here)."""
    ctx = RunContext(sampling_rate=0.5, sampling_scheme="poisson", num_clients=4, sample_size=2)
    s = DPFedAvg(clip=10.0, noise_multiplier=1e-9, ctx=ctx)
    ups = [upd(c, torch.ones(3)) for c in "abc"]
    res = s.aggregate(1, ups, s.init_state({KEY: torch.zeros(3)}))
    torch.testing.assert_close(res.global_state[KEY], torch.full((3,), 3 / 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["server", "distributed"])
def test_an_empty_poisson_round_releases_noise_alone_and_is_counted(mode: str) -> None:
    """Poisson sampling can draw nobody: the mechanism the accountant composes still runs (noise
    sigma S on a zero sum, divided by q N) and the round counts. Skipping it, as before, made the
    release depend on whether the drawn set was empty, which the amplified epsilon does not cover
    (an auditor's PLD: 6.57 against the reported 5.27 over 6 rounds at q = 0.25, N = 4)."""
    ctx = RunContext(sampling_rate=0.25, sampling_scheme="poisson", num_clients=4, sample_size=1)
    s = DPFedAvg(clip=0.5, noise_multiplier=1.3, noise=mode, ctx=ctx)
    state = s.init_state({KEY: torch.zeros(200, 200), "m.lora_A.weight": torch.ones(2, 2)})
    res = s.aggregate(1, [], state)
    assert res.state["rounds"] == 1 and res.metrics["epsilon"] == pytest.approx(epsilon(0.25, 1.3, 1, 1e-5))
    assert res.metrics["dp_noise"].startswith("server" if mode == "server" else "distributed without secure")
    noise_on_sum = res.global_state[KEY] * (0.25 * 4)  # the mean divides by q N = 1
    assert float(noise_on_sum.std()) == pytest.approx(1.3 * 0.5, rel=0.02)
    # fixed-size sampling: an empty round releases nothing and is not counted
    fixed = DPFedAvg(clip=0.5, noise_multiplier=1.3, noise=mode)
    kept = fixed.aggregate(1, [], fixed.init_state({KEY: torch.zeros(3)}))
    assert kept.state["rounds"] == 0 and torch.equal(kept.global_state[KEY], torch.zeros(3))


def test_an_empty_round_noises_only_what_clients_send() -> None:
    """FFA-LoRA sends B alone (A is the frozen shared init): an empty round's noise goes on B only."""
    ctx = RunContext(sampling_rate=0.25, sampling_scheme="poisson", num_clients=4, sample_size=1)
    s = DPFedAvg(inner="ffa_lora", clip=0.5, noise_multiplier=1.3, ctx=ctx)
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    res = s.aggregate(1, [], s.init_state({a: torch.ones(2, 8), b: torch.zeros(8, 2)}))
    assert torch.equal(res.global_state[a], torch.ones(2, 8)) and float(res.global_state[b].abs().sum()) > 0


def pld(event, steps: int, delta: float = 1e-5) -> float:
    """dp-accounting's PLD accountant (add/remove-one): the independent path."""
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    ("n", "k", "sigma", "rounds"),
    [(10, 2, 1.0, 50), (100, 10, 1.0, 50), (20, 5, 1.5, 50)],
)
def test_fixed_size_sampling_is_accounted_at_the_replace_one_sensitivity(
    n: int, k: int, sigma: float, rounds: int
) -> None:
    """k of n without replacement, replace-one neighbours: a replaced client moves the clipped sum
    by up to 2S. Balle, Barthe and Gaboardi (arXiv:1807.01647, Thm. 10) bound this by Poisson
    sampling at k/n under add/remove of the sensitivity-2S Gaussian, i.e. multiplier sigma / 2,
    which the PLD accountant computes tightly: the RDP epsilon we report must not be below it.
    The landed code passed sigma itself (19.97 at n=10, k=2: half the PLD's 38.7)."""
    reported = epsilon_of(Sampling("fixed", k / n, n, k), [sigma], rounds, 1e-5)
    tight = pld(dpa.PoissonSampledDpEvent(k / n, dpa.GaussianDpEvent(sigma / 2)), rounds)
    assert tight <= reported <= 3 * tight
    if (n, k, sigma) == (10, 2, 1.0):
        assert reported == pytest.approx(94.148, rel=1e-3)  # the value at the real sensitivity


def test_poisson_sampling_agrees_with_the_pld_accountant() -> None:
    """Poisson sampling, add/remove-one: the same event through RDP (reported) and PLD (tight)."""
    event = dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.0))
    reported = epsilon_of(Sampling("poisson", 0.1), [1.0], 100, 1e-5)
    tight = pld(event, 100)
    assert tight <= reported <= 1.5 * tight


def test_full_participation_agrees_with_the_pld_accountant() -> None:
    """q = 1: T Gaussians at sensitivity S (add/remove); the same through both paths."""
    reported = epsilon_of(Sampling("fixed", 1.0, 4, 4), [2.0], 20, 1e-5)
    tight = pld(dpa.GaussianDpEvent(2.0), 20)
    assert tight <= reported <= 1.5 * tight


def test_adaptive_clipping_under_fixed_sampling_halves_both_multipliers() -> None:
    """Replace-one also doubles the centred count's sensitivity (1/2 -> 1): both Gaussians halve."""
    sampling = Sampling("fixed", 0.2, 10, 2)
    got = epsilon_of(sampling, [1.2, 4.0], 10, 1e-5)
    event = dpa.SampledWithoutReplacementDpEvent(
        10, 2, dpa.ComposedDpEvent([dpa.GaussianDpEvent(0.6), dpa.GaussianDpEvent(2.0)])
    )
    assert got == pytest.approx(rdp(event, 10, relation=dpa.NeighboringRelation.REPLACE_ONE), rel=1e-9)


@pytest.mark.parametrize("randomness", ["seeded", "secure"])
def test_a_seeded_sample_is_public_and_the_record_says_what_epsilon_holds_then(randomness: str) -> None:
    """Amplification by subsampling assumes nobody knows the sample. Seeded, anyone holding the
    config recomputes it: the record names that and gives the unamplified epsilon (the worst client,
    in every round) beside the amplified one; secure sampling is secret and says so."""
    ctx = RunContext(
        sampling_rate=0.1, sampling_scheme="poisson", num_clients=100, sample_size=10, randomness=randomness
    )
    s = DPFedAvg(clip=0.1, noise_multiplier=1.0, ctx=ctx)
    state = s.init_state({KEY: torch.zeros(3)})
    for rnd in (1, 2, 3):
        res = s.aggregate(rnd, [upd("a", torch.ones(3))], state)
        state = res.state
    m = res.metrics
    assert m["epsilon"] == pytest.approx(epsilon_of(Sampling("poisson", 0.1), [1.0], 3, 1e-5))
    if randomness == "seeded":
        assert m["dp_sampling"].startswith("seeded: anyone holding the config")
        assert m["epsilon_sample_known"] == pytest.approx(rdp(dpa.GaussianDpEvent(1.0), 3))
        assert pld(dpa.GaussianDpEvent(1.0), 3) <= m["epsilon_sample_known"]
        assert m["epsilon_sample_known"] > 3 * m["epsilon"]
    else:
        assert m["dp_sampling"].startswith("secure:") and "epsilon_sample_known" not in m


def test_a_deployment_under_dp_needs_a_decision_on_client_metrics() -> None:
    """On a deployment each client's evaluation reply leaves it in the clear: under DP (or secure
    aggregation) `fedtune validate` asks for an explicit privacy.release_client_metrics."""
    from fedtune import components
    from fedtune.config import load_config

    for over in (["strategy.name=dp_fedavg"], ["train.dp_sgd.clip=1.0"], ["secure_aggregation=true"]):
        cfg = load_config(None, ["model.name=tiny", *over])
        problems = [p for p in components.check_engine(cfg, "flower-deploy") if "release_client_metrics" in str(p)]
        assert len(problems) == 1 and "leave it in the clear" in str(problems[0]), over
        assert not [p for p in components.check_engine(cfg, "flower-sim") if "release_client_metrics" in str(p)]
        decided = load_config(None, ["model.name=tiny", *over, "privacy.release_client_metrics=true"])
        assert not [p for p in components.check_engine(decided, "flower-deploy") if "release_client" in str(p)]
    plain = load_config(None, ["model.name=tiny"])
    assert not [p for p in components.check_engine(plain, "flower-deploy") if "release_client" in str(p)]

"""Epsilon for the mechanism exactly as run, computed by Google's `dp-accounting` (RDP).

One round (or one local DP-SGD step) releases one or more Gaussians (noise multipliers
`sigmas`: value noise, and for adaptive clipping the count noise at sensitivity 1/2), on a
sample drawn by the real scheme:
- 'poisson': every client (example) is in with probability q, independently
  (`PoissonSampledDpEvent`, add/remove-one neighbours);
- 'fixed': exactly k of n without replacement (`SampledWithoutReplacementDpEvent`, replace-one
  neighbours, the relation dp-accounting supports for it). Under replace-one a client's clipped
  update can change the sum by 2S, not S (the centred clip count by 1, not 1/2), and dp-accounting's
  RDP path reads a noise multiplier as noise over the replace-one sensitivity (its open issue #378):
  every multiplier is halved before it is composed (`replace_one_sigmas`). Checked against an
  independent path: Balle, Barthe and Gaboardi (arXiv:1807.01647, Thm. 10) bound sampling without
  replacement under substitution by Poisson sampling at q = k/n under add/remove of the
  substitution mechanism (sensitivity 2S), which dp-accounting's PLD accountant computes;
- q = 1: everyone, every time (no amplification).
The same event composed `steps` times gives epsilon at `delta`; it is recomputed from the step
count, so a resumed run reports the uninterrupted value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """How participants are drawn each step: scheme, rate q and, for 'fixed', k of n."""

    scheme: str = "poisson"  # 'poisson' | 'fixed'
    q: float = 1.0
    n: int = 1
    k: int = 1

    def describe(self) -> str:
        if self.q >= 1.0:
            return "every participant every step (q=1)"
        if self.scheme == "fixed":
            return f"fixed-size sampling without replacement, {self.k} of {self.n} (replace-one: sensitivity 2S)"
        return f"Poisson sampling, q={self.q:g} (add/remove-one)"


def replace_one_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Noise multipliers stated for add/remove-one sensitivity (S for the clipped sum, 1/2 for the
    centred count), re-expressed for replace-one, where both sensitivities double."""
    return [s / 2 for s in sigmas]


def step_event(sampling: Sampling, sigmas: Sequence[float]) -> Any:
    """The DpEvent of one step: the Gaussians it releases (multipliers at add/remove-one
    sensitivity, as the strategies state them), on the sample it draws."""
    import dp_accounting as dpa

    if sampling.scheme == "fixed" and sampling.q < 1.0:
        sigmas = replace_one_sigmas(sigmas)
    gauss = [dpa.GaussianDpEvent(s) for s in sigmas]
    event = gauss[0] if len(gauss) == 1 else dpa.ComposedDpEvent(gauss)
    if sampling.q >= 1.0:
        return event
    if sampling.scheme == "fixed":
        return dpa.SampledWithoutReplacementDpEvent(sampling.n, sampling.k, event)
    return dpa.PoissonSampledDpEvent(sampling.q, event)


def epsilon_of(sampling: Sampling, sigmas: Sequence[float], steps: int, delta: float) -> float:
    """(epsilon at delta) after `steps` compositions of `step_event(sampling, sigmas)`."""
    if steps <= 0:
        return 0.0
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that fail to converge are skipped
    relation = (
        dpa.NeighboringRelation.REPLACE_ONE
        if sampling.scheme == "fixed" and sampling.q < 1.0
        else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    acc = RdpAccountant(neighboring_relation=relation)
    acc.compose(dpa.SelfComposedDpEvent(step_event(sampling, sigmas), steps))
    return float(acc.get_epsilon(delta))


def epsilon_sample_known(sampling: Sampling, sigmas: Sequence[float], steps: int, delta: float) -> float:
    """Epsilon against a party that knows who took part (a seeded sample is public to anyone holding
    the config): no amplification by subsampling, every step counted as if the client took part
    (the worst client), at the scheme's sensitivity (2S under fixed-size sampling's replace-one)."""
    full = replace_one_sigmas(sigmas) if sampling.scheme == "fixed" and sampling.q < 1.0 else list(sigmas)
    return epsilon_of(Sampling("poisson", 1.0), full, steps, delta)


def adaptive_value_sigma(z: float, count_sigma: float) -> float:
    """Andrew et al. (arXiv:1905.03871, Thm. 1): to reach a total noise multiplier z with count
    noise sigma_b on centred bits (sensitivity 1/2), the value noise must be
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) > z."""
    inv = z**-2 - (2 * count_sigma) ** -2
    if inv <= 0:
        raise ValueError(
            f"count_noise = {count_sigma} must exceed noise_multiplier / 2 = {z / 2:g} "
            "(the clip-count noise is paid from the same privacy budget); raise count_noise"
        )
    return float(inv**-0.5)


def sample_epsilons(steps_so_far: Mapping[str, int], updates: Sequence[Any], dp: Any) -> dict[str, tuple[float, float]]:
    """Sample-level DP-SGD accounting: for each client that trained this round, (epsilon after
    its steps so far, epsilon after one more round like this one): Poisson-subsampled Gaussian per
    local step at the client's own rate (recorded by the client), composed over its steps."""
    out = {}
    for u in updates:
        if "dp_steps" not in u.metrics:
            continue
        now = int(steps_so_far.get(u.client_id, 0) + u.metrics["dp_steps"])
        poisson = Sampling("poisson", float(u.metrics["dp_rate"]))
        out[u.client_id] = (
            epsilon_of(poisson, [dp.noise_multiplier], now, dp.delta),
            epsilon_of(poisson, [dp.noise_multiplier], now + int(u.metrics["dp_steps"]), dp.delta),
        )
    return out

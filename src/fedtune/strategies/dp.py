"""User-level differential privacy: DP-FedAvg (McMahan et al., arXiv:1710.06963) around a strategy
whose aggregate is a mean of the transmitted tensors, with fixed or adaptive clipping (Andrew et
al., arXiv:1905.03871) and an RDP accountant from Google's `dp-accounting` (extra `dp`).

Each round, over the n updates that arrived (all transmitted tensors of one client = one vector):

    clip:   D_k <- D_k * min(1, S / ||D_k||)
    noise:  sum_k D_k + N(0, (sigma S)^2 I)      ('server'; 'distributed': each client adds
            N(0, (sigma S)^2 / n I) to its own clipped update, the same total in distribution)
    apply:  global <- global + (noisy sum) / n        (Poisson sampling: / q N, the expected count)

Under Poisson sampling the mechanism runs every round, a round that drew nobody too: noise alone
on a zero sum, counted by the accountant (skipping it would release whether the draw was empty,
which the amplified epsilon does not cover; `sampling.min_updates` > 1 is refused for the same
reason). The noise scales (adaptive clipping's count noise, hence z_delta) follow q N, never the
drawn count.

What is noised is what travels: A and B for `inner: fedavg / fedit`, only B for `ffa_lora`, only
R for `fedsb`, so the same sigma gives the same epsilon but very different noise per parameter.

Adaptive clipping (Andrew et al., Thm. 1): centred bits b_k = 1[||D_k|| <= S] - 1/2
(sensitivity 1/2), b = (sum b_k + N(0, sigma_b^2)) / n + 1/2, S <- S exp(-clip_lr (b - target_quantile)).
The count noise is paid from the same budget: for a total multiplier sigma the value noise is
z_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2) > sigma, and the accountant composes both Gaussians
(value at z_delta, count at 2 sigma_b), which together cost exactly a Gaussian at sigma. Only the
noised fraction is released (`dp_noisy_clipped_fraction`).

Accounting (`fedtune.privacy.accounting`, dp-accounting's RDP accountant): each round is the
composed Gaussian(s) on the sample the round really draws: Poisson sampling at the real rate q,
or fixed-size sampling without replacement (k of n, replace-one neighbours), or q = 1; composed
over the rounds done and recomputed from the round count, so a resumed run reports exactly the
uninterrupted value. `target_epsilon`: the run stops after the last round whose epsilon stays
within it.

With `secure_aggregation: true` the server never sees a single update, so clipping (and, with
noise 'distributed', each client's noise share) happen on the client before masking
(`client_transform`); the masked fixed-point sum is unweighted (capability sum_weight 'uniform',
the sensitivity is S per client) and the server only adds server noise, if any, and divides by n.
Adaptive clipping needs each client's clipped bit in the clear and is refused with secure
aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune.models.adapters import trainable_keys
from fedtune.privacy.accounting import Sampling, adaptive_value_sigma, epsilon_of, epsilon_sample_known
from fedtune.privacy.randomness import describe, noise_source
from fedtune.strategies.base import (
    STRATEGIES,
    Aggregate,
    Capabilities,
    PeerScoring,
    StrategyBase,
    inner_strategy,
    sorted_updates,
)
from fedtune.strategies.params import NonNegative, OpenUnit, Positive
from fedtune.types import AdapterState, ClientUpdate, add_states

SUM_STRATEGIES = ("fedavg", "fedit", "ffa_lora", "fedsb")


def epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    """(epsilon at delta) of `rounds` compositions of a Poisson-subsampled Gaussian (RDP)."""
    return epsilon_of(Sampling("poisson", q), [sigma], rounds, delta)


def norm(state: AdapterState) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


@STRATEGIES.register("dp_fedavg")
@dataclass(frozen=True)
class DPFedAvg(StrategyBase):
    """User-level DP-FedAvg: clip each client's update to S, Gaussian noise sigma * S on the sum,
    fixed or adaptive clipping, epsilon from an RDP accountant every round (module docstring)."""

    inner: Literal["fedavg", "fedit", "ffa_lora", "fedsb"] = "fedavg"
    clip: Positive = 0.1
    noise_multiplier: Positive = 1.0
    noise: Literal["server", "distributed"] = "server"
    adaptive: bool = False
    target_quantile: OpenUnit = 0.5
    clip_lr: NonNegative = 0.2
    count_noise: Positive | None = (
        None  # sigma_b; default max(m / 20 (Andrew et al.), noise_multiplier), m = expected count
    )
    delta: OpenUnit = 1e-5
    target_epsilon: Positive | None = None

    # with secure aggregation: clip + noise share on the client, an unweighted masked sum
    capabilities = Capabilities(sum_only=True, sum_weight="uniform", client_transform=True, accounts_sampling=True)

    def count_sigma(self, n: float) -> float | None:
        """sigma_b, the noise on the count of unclipped updates (adaptive clipping only); n is the
        expected client count (`expected_count`)."""
        if not self.adaptive:
            return None
        return self.count_noise if self.count_noise is not None else max(n / 20, self.noise_multiplier)

    def value_sigma(self, n: float) -> float:
        """The noise multiplier actually added to the clipped sum: sigma, or with adaptive
        clipping z_delta > sigma, so that value and count noise together cost sigma."""
        cs = self.count_sigma(n)
        return self.noise_multiplier if cs is None else adaptive_value_sigma(self.noise_multiplier, cs)

    def expected_count(self, n: int) -> float:
        """The client count the noise and the mean use: q N under Poisson sampling (the drawn count
        depends on who is in the data: a noise scale or denominator that followed it would leak
        it), else the n updates that arrived."""
        c = self.ctx
        return c.sampling_rate * c.num_clients if c.sampling_scheme == "poisson" and c.sampling_rate < 1 else n

    def travelling(self, rnd: int, state: dict[str, Any]) -> AdapterState:
        """The tensors a client's update has this round (what the inner strategy sends, less the
        frozen ones): what an empty round's noise goes on."""
        sent = next(iter(self._inner().configure(rnd, ["-"], state["inner"]).values()))
        return {k: sent[k] for k in trainable_keys(sent)}

    def sampling(self) -> Sampling:
        c = self.ctx
        return Sampling(c.sampling_scheme, c.sampling_rate, c.num_clients, c.sample_size)

    def privatize(self, delta: AdapterState, clip: float, rnd: int, client_id: str, n: int) -> AdapterState:
        """One client's contribution: its update clipped to `clip` (float64), plus its share of
        the noise, N(0, (sigma S)^2 / n), when the noise is 'distributed'."""
        nk = norm(delta)
        factor = min(1.0, clip / nk) if nk > 0 else 1.0
        out = {k: factor * v.double() for k, v in delta.items()}
        if self.noise == "distributed":  # from the client's own randomness
            noise = noise_source(self.ctx.randomness, self.ctx.seed, "dp-noise", rnd, client_id)
            for k in sorted(out):
                sigma = self.value_sigma(self.expected_count(n))
                out[k] += noise.normal(out[k].shape, torch.float64) * (sigma * clip / math.sqrt(n))
        return out

    def client_transform_config(self, state: dict[str, Any]) -> dict[str, Any]:
        """What a client needs for `client_transform` (sent with the round on Flower)."""
        return {"clip": float(state["clip"])}

    def client_transform(
        self, delta: AdapterState, state: dict[str, Any], rnd: int, client_id: str, n: int
    ) -> AdapterState:
        """What a client uploads under secure aggregation (before masking)."""
        return {k: v.float() for k, v in self.privatize(delta, float(state["clip"]), rnd, client_id, n).items()}

    @classmethod
    def config_problems(cls, params: dict[str, Any], adapter: Any, codec: Any, secure: bool) -> list[Any]:
        from fedtune.errors import Problem

        if secure and params.get("adaptive"):
            return [
                Problem(
                    "strategy.adaptive",
                    True,
                    "adaptive clipping needs each client's clipped/not-clipped bit, which secure aggregation hides",
                    "set strategy.adaptive: false (fixed clip) or secure_aggregation: false",
                )
            ]
        cn, nm = params.get("count_noise"), params.get("noise_multiplier", 1.0)
        if params.get("adaptive") and cn is not None and isinstance(nm, (int, float)) and cn <= nm / 2:
            return [
                Problem(
                    "strategy.count_noise",
                    cn,
                    f"must exceed noise_multiplier / 2 = {nm / 2:g} for adaptive clipping",
                    "raise count_noise (or leave it unset)",
                )
            ]
        return []  # the inner strategy's adapter algebra: components.check_strategy

    def _inner(self) -> Any:
        return inner_strategy(self.inner, self.ctx)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state, "inner": self._inner().init_state(global_state), "clip": self.clip, "rounds": 0}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        sent: Mapping[str, AdapterState] = self._inner().configure(rnd, client_ids, state["inner"])
        return sent

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        c = self.ctx
        poisson = c.sampling_scheme == "poisson" and c.sampling_rate < 1
        if not updates and not poisson:  # nothing released; the round is not counted
            return Aggregate(state["global"], state)
        ups = sorted_updates(updates)
        s = float(state["clip"])
        norms: list[float] = []
        if not ups:  # Poisson: nobody drawn (or every drawn client failed): the mechanism still runs, noise alone
            n = 0
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self.travelling(rnd, state).items()}
        elif ups[0].client_id == "secure-sum":  # clipped (and noised) on the clients; only the sum is known
            n = int(round(ups[0].num_examples))
            total = {k: v.double() * n for k, v in ups[0].delta.items()}
        else:
            n = len(ups)
            norms = [norm(u.delta) for u in ups]
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in ups[0].delta.items()}
            for u in ups:
                for k, v in self.privatize(u.delta, s, rnd, u.client_id, n).items():
                    total[k] += v
        m = self.expected_count(n)
        if self.noise == "server" or n == 0:  # no client shares in an empty round: the server adds it all
            noise = noise_source(self.ctx.randomness, self.ctx.seed, "dp-noise", rnd)
            for k in sorted(total):
                total[k] += noise.normal(total[k].shape, torch.float64) * (self.value_sigma(m) * s)
        # Poisson sampling: divide by the expected count q N, not the drawn one (how many clients were
        # drawn depends on who is in the data, and the accountant covers the noised sum only)
        denom = m
        mean = {k: (v / denom).float() for k, v in total.items()}
        new = add_states(state["global"], mean)
        inner = {**state["inner"], "global": new}

        # adaptive clipping (Andrew et al.): centred bits b_k - 1/2 (sensitivity 1/2), noised;
        # only the noised count is released
        count_sigma = self.count_sigma(m)
        next_clip, noisy_fraction = s, None
        if count_sigma is not None:
            below = sum(nk <= s for nk in norms)
            noise = noise_source(self.ctx.randomness, self.ctx.seed, "dp-clip", rnd)
            centred = below - n / 2 + float(noise.normal((1,), torch.float64)[0]) * count_sigma
            b = centred / denom + 0.5
            next_clip = s * math.exp(-self.clip_lr * (b - self.target_quantile))
            noisy_fraction = 1.0 - b
        sigmas = [self.value_sigma(m)] + ([2 * count_sigma] if count_sigma is not None else [])
        rounds = state["rounds"] + 1
        sampling = self.sampling()
        eps = epsilon_of(sampling, sigmas, rounds, self.delta)
        secure = bool(ups) and ups[0].client_id == "secure-sum"
        metrics: dict[str, Any] = {
            "dp_noise": (
                "server: drawn by the server, which sees each update"
                if self.noise == "server"
                else "distributed: each client's share, added on the client before masking"
                if secure
                else "distributed without secure aggregation: the shares are drawn by the server, which sees each "
                "update (no more than noise: server)"
            ),
            "epsilon": eps,
            "dp_delta": self.delta,
            "dp_randomness": describe(self.ctx.randomness),
            "dp_clip": s,
            "dp_accounting": f"RDP; {sampling.describe()}; Gaussians with noise multipliers "
            + " and ".join(f"{x:.4g}" for x in sigmas)
            + (" (clipped sum, centred clip count)" if count_sigma is not None else " (clipped sum)"),
        }
        if sampling.q < 1.0 and self.ctx.randomness != "secure":  # amplification assumes a secret sample
            metrics["dp_sampling"] = (
                "seeded: anyone holding the config can recompute who took part, so the amplified epsilon "
                "holds only against a party without it; epsilon_sample_known holds against one with it"
            )
            metrics["epsilon_sample_known"] = epsilon_sample_known(sampling, sigmas, rounds, self.delta)
        elif sampling.q < 1.0:
            metrics["dp_sampling"] = "secure: a secret sample from the OS CSPRNG each round (amplification holds)"
        if noisy_fraction is not None:  # the noised estimate adaptive clipping used (inside the guarantee)
            metrics["dp_noisy_clipped_fraction"] = noisy_fraction
        stop = None
        if (
            self.target_epsilon is not None
            and epsilon_of(sampling, sigmas, rounds + 1, self.delta) > self.target_epsilon
        ):
            stop = f"target_epsilon = {self.target_epsilon:g}: another round would give epsilon > target"
        new_state = {**state, "global": new, "inner": inner, "clip": next_clip, "rounds": rounds}
        return Aggregate(new, new_state, metrics, stop=stop)

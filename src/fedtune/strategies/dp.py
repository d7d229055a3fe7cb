"""User-level differential privacy: DP-FedAvg (McMahan et al., arXiv:1710.06963) around a strategy
whose aggregate is a mean of the transmitted tensors, with fixed or adaptive clipping (Andrew et
al., arXiv:1905.03871) and an RDP accountant from Google's `dp-accounting` (extra `dp`).

Each round, over the n updates that arrived (all transmitted tensors of one client = one vector):

    clip:   D_k <- D_k * min(1, S / ||D_k||)
    noise:  sum_k D_k + N(0, (sigma S)^2 I)      ('server'; 'distributed': each client adds
            N(0, (sigma S)^2 / n I) to its own clipped update, the same total in distribution)
    apply:  global <- global + (noisy sum) / n

What is noised is what travels: A and B for `inner: fedavg / fedit`, only B for `ffa_lora`, only
R for `fedsb`, so the same sigma gives the same epsilon but very different noise per parameter.

Adaptive clipping: b_k = 1[||D_k|| <= S]; b = (sum b_k + N(0, sigma_b^2)) / n;
S <- S exp(-clip_lr (b - target_quantile)); the count noise costs privacy, so the accountant uses
sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al., Thm. 1).

Accounting: each round is a Poisson-subsampled Gaussian mechanism with rate q = the sampling
fraction and noise multiplier sigma_eff, composed over the rounds done (RDP, then epsilon at
`delta`). fedtune samples a fixed number of clients without replacement; Poisson sampling at the
same rate is the standard approximation (stated in every round's `dp_accounting`). The epsilon is
recomputed from the round count, so a resumed run reports exactly the uninterrupted value.
`target_epsilon`: the run stops after the last round whose epsilon stays within it.

With `secure_aggregation: true` the server never sees a single update, so clipping (and, with
noise 'distributed', each client's noise share) happen on the client before masking
(`client_transform`); the masked fixed-point sum is unweighted (`secure_weight` = 1, the
sensitivity is S per client) and the server only adds server noise, if any, and divides by n.
Adaptive clipping needs each client's clipped bit in the clear and is refused with secure
aggregation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune.seeding import torch_generator
from fedtune.strategies.base import STRATEGIES, sorted_updates
from fedtune.types import AdapterState, ClientUpdate, add_states

SUM_STRATEGIES = ("fedavg", "fedit", "ffa_lora", "fedsb")


def epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    """(epsilon at delta) of `rounds` compositions of a Poisson-subsampled Gaussian (RDP)."""
    if rounds <= 0:
        return 0.0
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that fail to converge are skipped
    step = dpa.GaussianDpEvent(sigma) if q >= 1.0 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    acc = RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(step, rounds))
    return float(acc.get_epsilon(delta))


def effective_sigma(sigma: float, count_sigma: float | None) -> float:
    if count_sigma is None:
        return sigma
    inv = sigma**-2 - (2 * count_sigma) ** -2
    if inv <= 0:
        raise ValueError(
            f"count_noise = {count_sigma} must exceed noise_multiplier / 2 = {sigma / 2:g} "
            "(the clip-count noise is paid from the same privacy budget); raise count_noise"
        )
    return inv**-0.5


def norm(state: AdapterState) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


@STRATEGIES.register("dp_fedavg")
@dataclass(frozen=True)
class DPFedAvg:
    """User-level DP-FedAvg: clip each client's update to S, Gaussian noise sigma * S on the sum,
    fixed or adaptive clipping, epsilon from an RDP accountant every round (module docstring)."""

    inner: Literal["fedavg", "fedit", "ffa_lora", "fedsb"] = "fedavg"
    clip: float = 0.1
    noise_multiplier: float = 1.0
    noise: Literal["server", "distributed"] = "server"
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None  # sigma_b; default max(n / 20 (Andrew et al.), noise_multiplier)
    delta: float = 1e-5
    target_epsilon: float | None = None
    sampling_rate: float = 1.0  # set by fedtune (sampling.fraction)
    seed: int = 0  # set by fedtune

    has_global = True
    personalized = False
    pools_data = False
    transmits = True
    sum_aggregate = True  # with secure aggregation: clip + noise share on the client, masked sum

    @staticmethod
    def secure_weight(num_examples: int) -> float:
        """Weight of a client in the masked sum: 1 (DP-FedAvg averages clipped updates uniformly)."""
        return 1.0

    @classmethod
    def secure_problems(cls, params: dict[str, Any]) -> list[Any]:
        from fedtune.errors import Problem

        if params.get("adaptive"):
            return [
                Problem(
                    "strategy.adaptive",
                    True,
                    "adaptive clipping needs each client's clipped/not-clipped bit, which secure aggregation hides",
                    "set strategy.adaptive: false (fixed clip) or secure_aggregation: false",
                )
            ]
        return []

    def privatize(self, delta: AdapterState, clip: float, rnd: int, client_id: str, n: int) -> AdapterState:
        """One client's contribution: its update clipped to `clip` (float64), plus its share of
        the noise, N(0, (sigma S)^2 / n), when the noise is 'distributed'."""
        nk = norm(delta)
        factor = min(1.0, clip / nk) if nk > 0 else 1.0
        out = {k: factor * v.double() for k, v in delta.items()}
        if self.noise == "distributed":  # from the client's own generator
            gen = torch_generator(self.seed, "dp-noise", rnd, client_id)
            for k in sorted(out):
                out[k] += torch.randn(out[k].shape, generator=gen, dtype=torch.float64) * (
                    self.noise_multiplier * clip / math.sqrt(n)
                )
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
    def config_problems(cls, params: dict[str, Any], adapter: Any) -> list[Any]:
        from fedtune.errors import Problem

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
        if params.get("inner") == "fedsb" and adapter.kind != "lora_sb":
            return [
                Problem(
                    "adapter.kind", adapter.kind, "inner fedsb needs the LoRA-SB adapter", "set adapter.kind: lora_sb"
                )
            ]
        return []

    def _inner(self) -> Any:
        return STRATEGIES.get(self.inner)()

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state, "inner": self._inner().init_state(global_state), "clip": self.clip, "rounds": 0}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return self._inner().configure(rnd, client_ids, state["inner"])

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any]
    ) -> tuple[AdapterState, dict[str, Any]]:
        if not updates:
            return state["global"], state
        ups = sorted_updates(updates)
        s = float(state["clip"])
        if ups[0].client_id == "secure-sum":  # clipped (and noised) on the clients; only the sum is known
            n = int(round(ups[0].num_examples))
            norms: list[float] = []
            total = {k: v.double() * n for k, v in ups[0].delta.items()}
        else:
            n = len(ups)
            norms = [norm(u.delta) for u in ups]
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in ups[0].delta.items()}
            for u in ups:
                for k, v in self.privatize(u.delta, s, rnd, u.client_id, n).items():
                    total[k] += v
        if self.noise == "server":
            gen = torch_generator(self.seed, "dp-noise", rnd)
            for k in sorted(total):
                total[k] += torch.randn(total[k].shape, generator=gen, dtype=torch.float64) * (
                    self.noise_multiplier * s
                )
        mean = {k: (v / n).float() for k, v in total.items()}
        new = add_states(state["global"], mean)
        inner = {**state["inner"], "global": new}

        default_count = max(n / 20, self.noise_multiplier)  # must exceed sigma / 2 (see effective_sigma)
        count_sigma = (self.count_noise if self.count_noise is not None else default_count) if self.adaptive else None
        below = sum(nk <= s for nk in norms) if norms else n
        next_clip = s
        if self.adaptive:
            gen = torch_generator(self.seed, "dp-clip", rnd)
            b = (below + float(torch.randn(1, generator=gen, dtype=torch.float64)) * count_sigma) / n
            next_clip = s * math.exp(-self.clip_lr * (b - self.target_quantile))
        sigma = effective_sigma(self.noise_multiplier, count_sigma)
        rounds = state["rounds"] + 1
        eps = epsilon(self.sampling_rate, sigma, rounds, self.delta)
        metrics: dict[str, Any] = {
            "epsilon": eps,
            "dp_delta": self.delta,
            "dp_clip": s,
            "dp_clipped_fraction": 1 - below / n if norms else None,  # unknown under secure aggregation
            "dp_accounting": f"RDP, Poisson-subsampled Gaussian, q={self.sampling_rate:g}, sigma={sigma:.4g}",
        }
        if (
            self.target_epsilon is not None
            and epsilon(self.sampling_rate, sigma, rounds + 1, self.delta) > self.target_epsilon
        ):
            metrics["stop"] = f"target_epsilon = {self.target_epsilon:g}: another round would give epsilon > target"
        return new, {
            **state,
            "global": new,
            "inner": inner,
            "clip": next_clip,
            "rounds": rounds,
            "round_metrics": metrics,
        }

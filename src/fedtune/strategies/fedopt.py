"""Server optimizers on top of any strategy whose update is linear (Reddi et al., "Adaptive
Federated Optimization", arXiv:2003.00295; FedAvgM: Hsu et al., arXiv:1909.06335; DiLoCo's outer
Nesterov step: Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105).

The inner strategy's aggregate gives a pseudo-gradient D = new_global - global; the server then
takes an optimizer step with D instead of applying it directly. Optimizer moments are part of
the strategy state (a value), so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.strategies.base import STRATEGIES, Aggregate, PeerScoring, StrategyBase, inner_strategy
from fedtune.strategies.params import Decay, Positive
from fedtune.types import AdapterState, ClientUpdate

LINEAR = ("fedavg", "fedit", "ffa_lora")


def server_step(
    kind: str,
    global_state: AdapterState,
    pseudo_grad: AdapterState,
    m: AdapterState,
    v: AdapterState,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[AdapterState, AdapterState, AdapterState]:
    """One server optimizer step; returns (new global, m, v). Keys absent from pseudo_grad stay put."""
    new, m2, v2 = dict(global_state), dict(m), dict(v)
    for k, d in pseudo_grad.items():
        mk = m.get(k, torch.zeros_like(d))
        if kind == "fedavgm":
            m2[k] = beta1 * mk + d
            new[k] = global_state[k] + lr * m2[k]
            continue
        if kind == "diloco":  # SGD with Nesterov momentum on the outer gradient -D (torch.optim.SGD's form)
            m2[k] = beta1 * mk + d
            new[k] = global_state[k] + lr * (d + beta1 * m2[k])
            continue
        vk = v.get(k, torch.full_like(d, tau**2))
        m2[k] = beta1 * mk + (1 - beta1) * d
        d2 = d * d
        if kind == "fedadam":
            v2[k] = beta2 * vk + (1 - beta2) * d2
        else:  # fedyogi
            v2[k] = vk - (1 - beta2) * d2 * torch.sign(vk - d2)
        new[k] = global_state[k] + lr * m2[k] / (v2[k].sqrt() + tau)
    return new, m2, v2


@dataclass(frozen=True)
class _FedOpt(StrategyBase):
    inner: str = "fedavg"
    server_lr: Positive = 1.0
    beta1: Decay = 0.9
    beta2: Decay = 0.99
    tau: Positive = 1e-3

    kind = ""

    def __post_init__(self) -> None:
        if self.inner not in LINEAR:
            raise ValueError(f"inner = {self.inner!r}: a server optimizer needs a linear strategy, one of {LINEAR}")

    def _inner(self) -> Any:
        return inner_strategy(self.inner, self.ctx)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state, "inner": self._inner().init_state(global_state), "m": {}, "v": {}}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        sent: Mapping[str, AdapterState] = self._inner().configure(rnd, client_ids, state["inner"])
        return sent

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        if not updates:
            return Aggregate(state["global"], state)
        glob = state["global"]
        res = self._inner().aggregate(rnd, updates, state["inner"])
        target, inner = res.global_state, res.state
        touched = set().union(*(u.delta.keys() for u in updates))
        pseudo = {k: target[k] - glob[k] for k in touched}
        new, m, v = server_step(
            self.kind, glob, pseudo, state["m"], state["v"], self.server_lr, self.beta1, self.beta2, self.tau
        )
        inner = {**inner, "global": new}
        return Aggregate(new, {**state, "global": new, "inner": inner, "m": m, "v": v}, res.metrics)


@STRATEGIES.register("fedavgm")
@dataclass(frozen=True)
class FedAvgM(_FedOpt):
    """FedAvgM: server momentum on the inner strategy's pseudo-gradient (arXiv:1909.06335)."""

    kind = "fedavgm"


@STRATEGIES.register("diloco")
@dataclass(frozen=True)
class DiLoCo(_FedOpt):
    """DiLoCo's outer optimizer (arXiv:2311.08105, Algorithm 1): the outer gradient is
    global - mean(client models), i.e. -D, and the server takes a step of SGD with Nesterov
    momentum on it (the paper's lr 0.7, momentum 0.9); the inner optimizer is the clients' own
    (`train.optimizer`, AdamW by default, as in the paper). With `server_lr: 1, beta1: 0` it is
    the inner strategy."""

    kind = "diloco"
    server_lr: Positive = 0.7


@STRATEGIES.register("fedadam")
@dataclass(frozen=True)
class FedAdam(_FedOpt):
    """FedAdam: Adam on the server over the inner strategy's pseudo-gradient (arXiv:2003.00295)."""

    kind = "fedadam"
    server_lr: Positive = 1e-2


@STRATEGIES.register("fedyogi")
@dataclass(frozen=True)
class FedYogi(_FedOpt):
    """FedYogi: Yogi's additive second moment on the server (arXiv:2003.00295)."""

    kind = "fedyogi"
    server_lr: Positive = 1e-2

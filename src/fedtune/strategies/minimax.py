"""Federated minimax maths as pure functions on named tensors: FedMM's augmented-Lagrangian client
update and the server's consensus average (Shen et al., arXiv:2110.08477), and local gradient
descent-ascent averaged by the server (FedAvg-GDA), the baseline the paper beats.

The problem is min_x max_y sum_i f_i(x, y) over clients i. With v = (x, y) and the client's GDA
field F_i(v) = (grad_x f_i, -grad_y f_i) (descend in x, ascend in y), one round from the server's
v_bar is, for each client i with its dual variable lam_i (zero at the start, kept on the client):

    K local steps   v <- v - lr * (F_i(v) + lam_i + mu * (v - v_bar))
    dual ascent     lam_i <- lam_i + mu * (v_i - v_bar)
    message         z_i = v_i + lam_i / mu_t          (mu_t = mu * growth ** (t / 100))
    server          v_bar <- mean_i z_i

i.e. gradient steps on client i's augmented Lagrangian f_i(v) + <lam_i, v - v_bar> +
mu / 2 ||v - v_bar||^2, a primal-dual (consensus-ADMM-like) method applied to the GDA field. At a
fixed point v_i = v_bar (the dual stops moving) and F_i(v_bar) = -lam_i with sum_i lam_i = 0 (the
server's mean moves by mean_i lam_i / mu), so sum_i F_i(v_bar) = 0: the saddle point of the sum,
for any number of local steps. Local GDA averaging has no such correction: its fixed point moves
with the clients' heterogeneity and the number of local steps (client drift).

Provenance: the arXiv listing gives only the abstract here; the update above is read from the
authors' code (github.com/yshen22/FedMM: `pdgd.py` PDGradientDescent applies
`var -= lr * (grad + mu * (var - vstar) + lambda)`; `trainer/fedmm.py` does the dual step
`dual += lambda1 * (soln - latest)`, sends `soln + dual / lambdat_i` with
`lambdat_i = lambda1 * lambda1_decay ** (i / 100)`, and averages the clients uniformly). The
paper's own equations could not be retrieved; where the code and this module differ, the code's
choice was taken (uniform server weights, the growing divisor mu_t on the message only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from fedtune.types import AdapterState

#: client i's GDA field at v: (grad_x f_i, -grad_y f_i), keyed like v
Field = Callable[[AdapterState], AdapterState]
Method = Literal["fedmm", "gda"]


def corrected_field(
    field: AdapterState, v: AdapterState, anchor: AdapterState, dual: AdapterState, mu: float
) -> AdapterState:
    """FedMM's local direction F_i(v) + lam_i + mu * (v - v_bar) (keys of `field`; a key without a
    dual or an anchor gets no correction)."""
    out = {}
    for k, g in field.items():
        d = g
        if k in dual:
            d = d + dual[k].to(g)
        if k in anchor and mu:
            d = d + mu * (v[k].to(g) - anchor[k].to(g))
        out[k] = d
    return out


def dual_ascent(dual: AdapterState, v: AdapterState, anchor: AdapterState, mu: float) -> AdapterState:
    """lam_i + mu * (v_i - v_bar) (a missing dual starts at zero)."""
    return {k: dual.get(k, torch.zeros_like(v[k])) + mu * (v[k] - anchor[k]) for k in v}


def message(v: AdapterState, dual: AdapterState, mu_t: float) -> AdapterState:
    """z_i = v_i + lam_i / mu_t, what client i sends (the server averages these)."""
    return {k: v[k] + dual[k] / mu_t if k in dual else v[k] for k in v}


def message_mu(mu: float, growth: float, rnd: int) -> float:
    """mu_t = mu * growth ** (t / 100): the authors' growing divisor of the message (growth 1: mu)."""
    return float(mu * growth ** (rnd / 100.0))


def consensus(msgs: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """The server's v_bar = sum_i w_i z_i (in the messages' dtype; fp64 for the reference runs)."""
    return {k: sum((w * m[k] for m, w in zip(msgs, weights)), torch.zeros_like(msgs[0][k])) for k in msgs[0]}


def local_round(
    v_bar: AdapterState,
    dual: AdapterState,
    field: Field,
    steps: int,
    lr: float,
    mu: float,
    mu_t: float,
    method: Method = "fedmm",
) -> tuple[AdapterState, AdapterState]:
    """One client's round by plain gradient steps on its field: (message z_i, new dual).
    'gda': v <- v - lr * F_i(v), message v_i, no dual (FedAvg-GDA)."""
    v = {k: t.clone() for k, t in v_bar.items()}
    for _ in range(steps):
        g = field(v)
        d = corrected_field(g, v, v_bar, dual, mu) if method == "fedmm" else g
        v = {k: v[k] - lr * d[k] if k in d else v[k] for k in v}
    if method == "gda":
        return v, dual
    new_dual = dual_ascent(dual, v, v_bar, mu)
    return message(v, new_dual, mu_t), new_dual


def federated_minimax(
    fields: Sequence[Field],
    v0: AdapterState,
    rounds: int,
    steps: int,
    lr: float,
    mu: float = 1.0,
    method: Method = "fedmm",
    growth: float = 1.0,
    weights: Sequence[float] | None = None,
) -> list[AdapterState]:
    """The server's models v_bar after each of `rounds` rounds with every client taking part
    (uniform weights unless `weights`): the reference run of either method on any fields."""
    w = list(weights) if weights is not None else [1.0 / len(fields)] * len(fields)
    v_bar = {k: t.double() for k, t in v0.items()}
    duals: list[AdapterState] = [{} for _ in fields]
    out = []
    for t in range(1, rounds + 1):
        msgs = []
        for i, f in enumerate(fields):
            z, duals[i] = local_round(v_bar, duals[i], f, steps, lr, mu, message_mu(mu, growth, t), method)
            msgs.append(z)
        v_bar = consensus(msgs, w)
        out.append(v_bar)
    return out

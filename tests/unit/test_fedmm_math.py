"""FedMM's update (arXiv:2110.08477) on a quadratic minimax toy with heterogeneous clients, against
the closed-form saddle point of the sum and the closed-form fixed point of local GDA averaging."""

from __future__ import annotations

import pytest
import torch

from fedtune.strategies.minimax import (
    corrected_field,
    dual_ascent,
    federated_minimax,
    local_round,
    message,
    message_mu,
)

# f_i(x, y) = a_i/2 x^2 + b_i x y - c_i/2 y^2 + d_i x - e_i y: weak curvature, bilinear-dominated,
# the coupling b_i even changes sign across clients
A = [0.2, 0.1, 0.3]
B = [2.0, -0.5, 1.0]
C = [0.1, 0.3, 0.2]
D = [1.0, -2.0, 0.5]
E = [-1.0, 0.5, 2.0]
LR, MU, ROUNDS = 0.05, 1.0, 300


def jacobian(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F_i(v) = J_i v + g_i with F_i = (df_i/dx, -df_i/dy)."""
    j = torch.tensor([[A[i], B[i]], [-B[i], C[i]]], dtype=torch.float64)
    return j, torch.tensor([D[i], E[i]], dtype=torch.float64)


def field(i: int):  # type: ignore[no-untyped-def]
    def f(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = v["x"], v["y"]
        return {"x": A[i] * x + B[i] * y + D[i], "y": -(B[i] * x - C[i] * y - E[i])}

    return f


def saddle() -> torch.Tensor:
    """sum_i F_i(v*) = 0: [[sum a, sum b], [-sum b, sum c]] v* = -(sum d, sum e)."""
    j = sum(jacobian(i)[0] for i in range(3))
    g = sum(jacobian(i)[1] for i in range(3))
    return torch.linalg.solve(j, -g)  # type: ignore[arg-type]


def gda_fixed_point(steps: int) -> torch.Tensor:
    """Local GDA is affine per client, v -> M_i^K v + S_i g_i with M_i = I - lr J_i and
    S_i = -lr sum_{j<K} M_i^j; the averaged map's fixed point solves (I - mean M_i^K) v = mean S_i g_i."""
    eye = torch.eye(2, dtype=torch.float64)
    mk, sg = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for i in range(3):
        j, g = jacobian(i)
        m = eye - LR * j
        mk += torch.linalg.matrix_power(m, steps) / 3
        s = -LR * sum(torch.linalg.matrix_power(m, p) for p in range(steps))
        sg += s @ g / 3  # type: ignore[operator]
    return torch.linalg.solve(eye - mk, sg)


def run(method: str, steps: int, rounds: int = ROUNDS) -> list[torch.Tensor]:
    v0 = {"x": torch.zeros((), dtype=torch.float64), "y": torch.zeros((), dtype=torch.float64)}
    traj = federated_minimax([field(i) for i in range(3)], v0, rounds, steps, LR, MU, method)  # type: ignore[arg-type]
    return [torch.stack([t["x"], t["y"]]) for t in traj]


@pytest.mark.parametrize("steps", [10, 20, 40])
def test_fedmm_converges_to_the_saddle_point_of_the_sum(steps: int) -> None:
    traj = run("fedmm", steps)

    assert torch.allclose(traj[-1], saddle(), atol=1e-8)


@pytest.mark.parametrize("steps", [3, 5])
def test_fedmm_needs_enough_local_steps_to_solve_its_subproblem(steps: int) -> None:
    # with lr * mu * K small the local augmented-Lagrangian problem is solved too inexactly and the
    # primal-dual iteration blows up on this bilinear-dominated toy (measured, not a paper claim)
    assert float((run("fedmm", steps)[-1] - saddle()).norm()) > 1e3


def test_local_gda_averaging_stalls_at_the_biased_fixed_point() -> None:
    traj = run("gda", 10)

    fixed = gda_fixed_point(10)
    assert torch.allclose(traj[-1], fixed, atol=1e-8)  # converged: it stalls there
    assert torch.allclose(traj[-2], traj[-1], atol=1e-10)
    assert float((fixed - saddle()).norm()) > 0.3  # and that point is far from the saddle
    assert float((run("fedmm", 10)[-1] - saddle()).norm()) < 1e-8


def test_one_gda_step_per_round_is_centralized_gda_with_no_bias() -> None:
    # K = 1: averaging one step of each client is one step on the sum, whose fixed point is the saddle
    assert torch.allclose(gda_fixed_point(1), saddle(), atol=1e-10)


def test_fedmm_fixed_point_duals_cancel() -> None:
    v = {"x": saddle()[0], "y": saddle()[1]}
    duals = [{k: -t for k, t in field(i)(v).items()} for i in range(3)]  # lam_i = -F_i(v*)

    outs = [local_round(v, duals[i], field(i), 7, LR, MU, MU) for i in range(3)]

    for (z, lam), d in zip(outs, duals):  # nothing moves: v_i = v_bar, lam_i unchanged, z_i = v + lam/mu
        assert torch.allclose(lam["x"], d["x"]) and torch.allclose(lam["y"], d["y"])
        assert torch.allclose(z["x"], v["x"] + d["x"] / MU)
    assert abs(float(sum(lam["x"] for _, lam in outs))) < 1e-10


def test_update_terms_by_hand() -> None:
    v, anchor = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 0.0])}
    dual, grad = {"w": torch.tensor([0.1, -0.2])}, {"w": torch.tensor([3.0, 4.0])}

    d = corrected_field(grad, v, anchor, dual, 2.0)
    lam = dual_ascent(dual, v, anchor, 2.0)
    z = message(v, lam, 4.0)

    assert torch.allclose(d["w"], torch.tensor([3.0 + 0.1 + 1.0, 4.0 - 0.2 + 4.0]))
    assert torch.allclose(lam["w"], torch.tensor([0.1 + 1.0, -0.2 + 4.0]))
    assert torch.allclose(z["w"], torch.tensor([1.0 + 1.1 / 4, 2.0 + 3.8 / 4]))
    assert message_mu(2.0, 1.05, 200) == pytest.approx(2.0 * 1.05**2)

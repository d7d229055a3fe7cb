import pytest
import torch

from fedtune.client.train import TrainData, TrainSpec, local_train_, proximal_term
from fedtune.config import config_from_dict
from fedtune.errors import ConfigError
from fedtune.strategies.base import STRATEGIES
from fedtune.strategies.fedopt import server_step
from fedtune.types import ClientUpdate


def test_fedadam_step_matches_the_formula() -> None:
    g = {"w": torch.tensor([1.0, -2.0])}
    d = {"w": torch.tensor([0.5, 0.1])}
    new, m, v = server_step("fedadam", g, d, {}, {}, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    m_exp = 0.1 * d["w"]
    v_exp = 0.99 * 1e-6 + 0.01 * d["w"] ** 2
    torch.testing.assert_close(m["w"], m_exp)
    torch.testing.assert_close(v["w"], v_exp)
    torch.testing.assert_close(new["w"], g["w"] + 0.1 * m_exp / (v_exp.sqrt() + 1e-3))


def test_fedyogi_second_moment_is_additive() -> None:
    d = {"w": torch.tensor([2.0])}
    _, _, v = server_step("fedyogi", {"w": torch.zeros(1)}, d, {}, {"w": torch.tensor([1.0])}, 0.1, 0.9, 0.5, 1e-3)
    torch.testing.assert_close(v["w"], torch.tensor([1.0 - 0.5 * 4.0 * -1.0]))  # v - (1-b2) d^2 sign(v - d^2)


def test_fedavgm_with_lr_1_and_no_momentum_is_fedavg() -> None:
    g = torch.Generator().manual_seed(0)
    glob = {"a.lora_B.weight": torch.randn(3, 2, generator=g)}
    ups = [ClientUpdate(f"c{i}", {"a.lora_B.weight": torch.randn(3, 2, generator=g)}, i + 1) for i in range(3)]
    res = STRATEGIES.get("fedavg")().aggregate(1, ups, {"global": glob})
    avg, _ = res.global_state, res.state
    m = STRATEGIES.get("fedavgm")(server_lr=1.0, beta1=0.0)
    res = m.aggregate(1, ups, m.init_state(glob))
    new = res.global_state
    torch.testing.assert_close(new["a.lora_B.weight"], avg["a.lora_B.weight"])
    # momentum carries over: a second identical round moves further than plain FedAvg would
    m9 = STRATEGIES.get("fedavgm")(server_lr=1.0, beta1=0.9)
    s9 = m9.init_state(glob)
    res = m9.aggregate(1, ups, s9)
    one, s9 = res.global_state, res.state
    res = m9.aggregate(2, ups, s9)
    two, _ = res.global_state, res.state
    step1 = (one["a.lora_B.weight"] - glob["a.lora_B.weight"]).norm()
    step2 = (two["a.lora_B.weight"] - one["a.lora_B.weight"]).norm()
    assert step2 > 1.5 * step1


def test_diloco_outer_step_is_torch_sgd_nesterov_on_minus_the_pseudo_gradient() -> None:
    """DiLoCo (arXiv:2311.08105): outer gradient = global - averaged model, Nesterov SGD, lr 0.7,
    momentum 0.9; pinned to torch.optim.SGD over three rounds with different pseudo-gradients."""
    g = torch.Generator().manual_seed(1)
    glob = {"w": torch.randn(4, 3, generator=g)}
    ref = torch.nn.Parameter(glob["w"].clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    state: tuple = (glob, {}, {})
    for _ in range(3):
        target = state[0]["w"] + torch.randn(4, 3, generator=g)  # the round's averaged model
        d = {"w": target - state[0]["w"]}
        state = server_step("diloco", state[0], d, state[1], state[2], 0.7, 0.9, 0.99, 1e-3)
        opt.zero_grad()
        ref.grad = -d["w"].clone()
        opt.step()
        torch.testing.assert_close(state[0]["w"], ref.detach(), rtol=0, atol=1e-6)
    s = STRATEGIES.get("diloco")()
    assert (s.server_lr, s.beta1, s.inner) == (0.7, 0.9, "fedavg")  # the paper's outer settings


def test_server_optimizer_refuses_a_nonlinear_inner_strategy() -> None:
    with pytest.raises(ConfigError, match="needs a linear strategy"):
        config_from_dict({"strategy": {"name": "fedadam", "inner": "local"}})


def test_fedprox_term_pulls_towards_the_received_weights() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    anchor = torch.ones(3)

    class M(torch.nn.Module):
        def forward(self, input_ids, labels):  # noqa: ARG002
            return type("O", (), {"loss": ((w - 5) ** 2).sum()})()

    spec = TrainSpec(steps=300, lr=0.1, max_grad_norm=None)
    local_train_(
        M(),
        [w],
        TrainData(torch.zeros(4, 2, dtype=torch.long)),
        spec,
        torch.Generator(),
        extra_loss=proximal_term([w], [anchor], mu=2.0),
    )
    # minimiser of (w-5)^2 + (w-1)^2 is w = 3
    torch.testing.assert_close(w.detach(), torch.full((3,), 3.0), atol=2e-2, rtol=0)

"""SAM as a local-step option (`train.sam_rho`, `client.sam`) and DFedSAM's config checks: one
step by hand on L(w) = sum(w^4) / 4, whose gradient w^3 changes along the ascent direction."""

import math
from types import SimpleNamespace

import pytest
import torch

from fedtune.client.sam import sam_perturb_, sam_restore_
from fedtune.client.train import Batches, TrainSpec, accumulated_step_, batch_indices


class Quartic(torch.nn.Module):
    """A model whose loss is sum(w^4) / 4, whatever the batch (lm_loss's `labels` path)."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.w.pow(4).sum() / 4)


def one_step(rho: float, lr: float = 0.1) -> tuple[list[float], float]:
    model = Quartic([1.0, 2.0])
    spec = TrainSpec(lr=lr, optimizer="sgd", max_grad_norm=None, sam_rho=rho, batch_size=1, grad_accum=2)
    blocks = torch.zeros(4, 3, dtype=torch.long)
    data = Batches(blocks, None, batch_indices(4, 1, torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD([model.w], lr=lr)
    loss = accumulated_step_(model, opt, [model.w], data, spec, 0)
    return model.w.detach().tolist(), loss


def test_a_sam_step_takes_the_gradient_at_the_ascent_point_by_hand() -> None:
    # g = w^3 = (1, 8), ||g|| = sqrt(65), e = rho g / ||g||; w <- w - lr (w + e)^3
    rho, lr = 0.5, 0.1
    e = [rho * 1 / math.sqrt(65), rho * 8 / math.sqrt(65)]
    want = [1.0 - lr * (1.0 + e[0]) ** 3, 2.0 - lr * (2.0 + e[1]) ** 3]
    w, loss = one_step(rho, lr)
    assert w == pytest.approx(want, rel=1e-6)
    assert loss == pytest.approx((1 + 16) / 4)  # the loss at w, not at the perturbed point


def test_rho_zero_is_the_plain_step() -> None:
    w, _ = one_step(0.0, 0.1)
    assert w == pytest.approx([1.0 - 0.1 * 1.0, 2.0 - 0.1 * 8.0])


def test_perturb_then_restore_is_the_identity_and_moves_rho_along_g() -> None:
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    q = torch.nn.Parameter(torch.tensor([1.0]))  # no gradient: stays put
    p.grad = torch.tensor([3.0, 4.0])
    e = sam_perturb_([p, q], rho=0.5)
    assert p.detach().tolist() == pytest.approx([3.3, -3.6])  # + 0.5 * (0.6, 0.8)
    assert q.item() == 1.0 and float(torch.cat([x.flatten() for x in e]).norm()) == pytest.approx(0.5)
    sam_restore_([p, q], e)
    assert p.detach().tolist() == pytest.approx([3.0, -4.0])


def test_the_config_checks_tie_sam_to_the_methods_that_take_it(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="train.sam_rho is 0"):
        tiny_cfg("strategy.name=dfedsam")
    with pytest.raises(ConfigError, match="has no server"):  # Flower refuses it by name
        tiny_cfg("strategy.name=dfedsam", "train.sam_rho=0.05", "engine.name=flower-sim")
    with pytest.raises(ConfigError, match="DP-SGD's per-example step does not take SAM steps"):
        tiny_cfg("train.sam_rho=0.05", "train.dp_sgd.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match="own client update does not take SAM steps"):
        tiny_cfg("strategy.name=fedkseed", "train.sam_rho=0.05")
    assert tiny_cfg("strategy.name=dfedsam", "train.sam_rho=0.05").train.sam_rho == 0.05
    assert tiny_cfg("train.sam_rho=0.05").strategy.name == "fedavg"  # any first-order strategy may use it

"""RM-LoRA (arXiv:2407.12074): the orthogonality regulariser and its gradient, the masked
gradient, the entropy effective rank, LoRA's parameter budget, and the round-record metric."""

import math

import pytest
import torch

from fedtune.adapters import build_adapter
from fedtune.adapters.base import InjectContext
from fedtune.adapters.rm_lora import (
    effective_rank,
    mask_gradient,
    mean_effective_rank,
    orthogonality_penalty,
)
from fedtune.config.adapters import LoraAdapterConfig, RMLoraAdapterConfig
from fedtune.config.schema import ModelConfig
from fedtune.models.adapters import adapter_parameters, get_state
from fedtune.models.load import load_model, tiny_dir


def tiny(options):
    mcfg = ModelConfig(name="tiny")
    adapter = build_adapter(options)
    return adapter, adapter.inject(load_model(str(tiny_dir(mcfg, 0)), mcfg), InjectContext(seed=0, model_type="llama"))


def test_the_regulariser_and_its_gradient_on_a_hand_computed_case() -> None:
    # A A^T = [[1, 1], [1, 2]] -> off-diagonal squares 2; B^T B = [[2, 2], [2, 5]] -> 8
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    b = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    r = orthogonality_penalty(a, b)
    assert float(r.detach()) == pytest.approx(10.0)
    r.backward()
    # d/da_i sum_{i != j} (a_i . a_j)^2 = 4 sum_{j != i} (a_i . a_j) a_j, with a_0 . a_1 = 1
    torch.testing.assert_close(a.grad, torch.tensor([[4.0, 4.0], [4.0, 0.0]]))
    # columns of B: b_0 = (1, 0, 1), b_1 = (2, 1, 0), b_0 . b_1 = 2 -> 4 * 2 * the other column
    torch.testing.assert_close(b.grad, torch.tensor([[16.0, 8.0], [8.0, 0.0], [0.0, 8.0]]))
    # orthogonal rows / columns: nothing to push apart, whatever the norms
    assert float(orthogonality_penalty(torch.diag(torch.tensor([3.0, 2.0])), torch.eye(3, 2) * 5)) == 0.0


def test_the_masked_gradient_is_the_gradient_times_a_seeded_bernoulli_mask() -> None:
    grad = torch.arange(1.0, 41.0).reshape(4, 10)
    torch.manual_seed(7)
    masked = mask_gradient(grad, 0.25)
    torch.manual_seed(7)
    keep = torch.rand(4, 10) >= 0.25
    torch.testing.assert_close(masked, grad * keep)
    assert 0 < int((masked == 0).sum()) < 40  # some entries dropped, not all


def test_the_injected_model_masks_lora_gradients_and_adds_the_weighted_regulariser() -> None:
    adapter, model = tiny(RMLoraAdapterConfig(r=2, alpha=4, reg_weight=0.5, mask_prob=0.5))
    params = adapter_parameters(model)
    model(input_ids=torch.zeros((1, 8), dtype=torch.long))
    aux = adapter.aux_loss(model)
    keys = sorted(k for k in params if k.endswith(".lora_A.weight"))
    expected = sum(orthogonality_penalty(params[k], params[k.replace("lora_A", "lora_B")]) for k in keys)
    torch.testing.assert_close(aux, 0.5 * expected)
    aux.backward()  # B = 0: only A has a gradient; half its entries are masked
    grads = torch.cat([params[k].grad.flatten() for k in keys])
    assert 0.3 < float((grads == 0).float().mean()) < 0.7
    plain, lmodel = tiny(LoraAdapterConfig(r=2, alpha=4))
    assert plain.aux_loss(lmodel) is None
    assert build_adapter(RMLoraAdapterConfig(reg_weight=0.0)).aux_loss(model) is None


@pytest.mark.parametrize(
    "sv,expected",
    [
        ([2.0, 2.0], 2.0),  # rank 2, equal singular values
        ([5.0, 0.0, 0.0], 1.0),
        ([3.0, 1.0], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),  # 1.7548...
        ([0.0, 0.0], 0.0),
    ],
)
def test_entropy_effective_rank_of_known_spectra(sv: list[float], expected: float) -> None:
    assert effective_rank(torch.tensor(sv)) == pytest.approx(expected)


def test_effective_rank_of_a_lora_state_is_the_mean_over_modules_of_s_b_a() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    state = {
        "m1.lora_A.weight": a,
        "m1.lora_B.weight": torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]),  # dW: sv (2, 2)
        "m2.lora_A.weight": a,
        "m2.lora_B.weight": torch.tensor([[1.0, 3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),  # dW: rank 1
    }
    assert mean_effective_rank(state, scale=7.0) == pytest.approx((2.0 + 1.0) / 2)
    assert mean_effective_rank({"x.weight": a}, 1.0) is None


def test_rm_lora_has_lora_s_parameter_budget_and_reports_its_effective_rank(tiny_with_lora, random_shard) -> None:
    from fedtune.client.round import client_round
    from fedtune.client.train import TrainSpec

    counts = {}
    for options in (LoraAdapterConfig(r=2, alpha=4), RMLoraAdapterConfig(r=2, alpha=4)):
        adapter, model = tiny(options)
        counts[options.kind] = sum(p.numel() for p in adapter_parameters(model).values())
    print("trainable parameters (tiny llama, r=2):", counts)
    assert counts["rm_lora"] == counts["lora"] > 0
    spec = TrainSpec(steps=3, batch_size=4, lr=0.05)
    _, metrics, _ = client_round(model, get_state(model), random_shard("c1"), spec, 0, 1, adapter=adapter)
    assert 1.0 <= metrics["adapter_effective_rank"] <= 2.0
    lmodel, init = tiny_with_lora()
    _, lmetrics, _ = client_round(lmodel, init, random_shard("c1"), spec, 0, 1)
    assert "adapter_effective_rank" not in lmetrics  # plain LoRA declares no state metrics

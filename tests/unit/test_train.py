import math

import pytest
import torch

from fedtune.client.train import TrainData, TrainSpec, get_lr, local_train_
from fedtune.errors import TrainingDivergedError


def test_lr_schedules() -> None:
    s = TrainSpec(lr=1.0, lr_schedule="cosine", warmup_steps=2)
    assert [get_lr(i, 10, s) for i in (0, 1)] == [0.5, 1.0]
    assert get_lr(2, 10, s) == pytest.approx(1.0)
    assert get_lr(6, 10, s) == pytest.approx(0.5)  # halfway through the cosine
    lin = TrainSpec(lr=2.0, lr_schedule="linear")
    assert get_lr(5, 10, lin) == pytest.approx(1.0)
    assert get_lr(3, 10, TrainSpec(lr=0.3)) == 0.3


def test_epochs_set_the_number_of_steps() -> None:
    assert TrainSpec(epochs=2, batch_size=4, grad_accum=2).num_steps(20) == 5
    assert TrainSpec(steps=7).num_steps(1000) == 7


class Quadratic(torch.nn.Module):
    """A stand-in 'language model' whose loss is ||w - 3||^2 (any batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, input_ids, labels):  # noqa: ARG002
        return type("Out", (), {"loss": ((self.w - 3) ** 2).sum()})()


def test_local_train_minimises_the_loss_and_reports_it() -> None:
    m = Quadratic()
    spec = TrainSpec(steps=200, lr=0.1, batch_size=2, max_grad_norm=None)
    metrics = local_train_(
        m, [m.w], TrainData(torch.zeros(8, 4, dtype=torch.long)), spec, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(m.w.detach(), torch.full((4,), 3.0), atol=1e-2, rtol=0)
    assert metrics["steps"] == 200 and metrics["train_last_loss"] < 1e-3


def test_nan_loss_stops_training() -> None:
    m = Quadratic()
    with torch.no_grad():
        m.w[0] = math.nan
    with pytest.raises(TrainingDivergedError, match="loss is nan at local step 0"):
        local_train_(m, [m.w], TrainData(torch.zeros(4, 4, dtype=torch.long)), TrainSpec(steps=3), torch.Generator())


def test_gradient_checkpointing_recomputes_layers_and_keeps_the_lora_gradients() -> None:
    """`model.gradient_checkpointing`: a decoder layer's projections run twice per step (forward, then
    again in the backward pass), and the LoRA gradients are those of the plain step."""
    from fedtune.config.schema import LoraAdapterConfig, ModelConfig
    from fedtune.models.adapters import inject_, lora_config
    from fedtune.models.load import load_model, tiny_dir

    def step(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        mcfg = ModelConfig(name="tiny", gradient_checkpointing=checkpointing)
        model = inject_(
            load_model(str(tiny_dir(mcfg, 0)), mcfg), lora_config(LoraAdapterConfig(r=2, alpha=4), "llama"), 0
        )
        with torch.no_grad():  # B = 0 at init would make every A gradient zero
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        calls = []
        # a pre-hook: the recompute stops early once the tensors the backward needs are rebuilt
        q = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        q.register_forward_pre_hook(lambda *_: calls.append(1))
        model.train()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        return len(calls), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_calls, plain = step(False)
    ckpt_calls, ckpt = step(True)
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert plain.keys() == ckpt.keys() and len(plain) == 8  # A and B on q, v of 2 layers
    for k in plain:
        assert ckpt[k] is not None and plain[k].abs().sum() > 0
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)

"""Padding-free packing (`train.packing`, `fedtune.client.packing`): the layout on a hand-built
batch, and the packed loss and gradients against the unpacked ones for every declared model type
and attention kernel (a type whose forward ignored the positions, or built a plain causal mask,
would mix examples and fail here)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedtune.client.packing import PACKABLE_MODEL_TYPES, bins_first_fit, example_lengths, pack_rows
from fedtune.client.train import target_loss
from fedtune.models import attention
from strict_device import strict_backend, strict_device

strict_backend()  # registered at collection, before any backward pass of the session (test_host_tensors.py)


def test_layout_of_a_hand_built_batch() -> None:
    # lengths to the last target: 6, 2, 3, 0 (no target), 4 -> capacity 6; first-fit decreasing:
    # row 0 fills a row, row 4 starts one, row 2 (3) does not fit its room (2) and starts a third,
    # row 1 (2) joins row 4; row 3 has nothing to learn and is left out
    mask = torch.zeros(5, 8, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 1] = True
    mask[2, 2] = True
    mask[4, 2:4] = True
    assert example_lengths(mask) == [6, 2, 3, 0, 4]
    assert bins_first_fit([6, 2, 3, 0, 4]) == [[0], [4, 1], [2]]
    ids = torch.arange(40).reshape(5, 8)
    packed = pack_rows(ids, mask)
    assert packed is not None
    assert packed.ids.tolist() == [[0, 1, 2, 3, 4, 5], [32, 33, 34, 35, 8, 9], [16, 17, 18, 0, 0, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    # targets keep their tokens; the first token of each example is never one
    assert packed.mask.int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0]]
    assert int(packed.mask.sum()) == int(mask[:, 1:].sum())


def test_nothing_to_save_runs_the_batch_as_it_is() -> None:
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:5] = True  # two examples of 5 tokens: no two fit one row
    assert pack_rows(torch.ones(2, 5, dtype=torch.long), mask) is None


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, head_dim=8))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2))
    assert model.config.model_type == kind
    return model.eval()


def _instruction_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of prompt + answer of very different lengths (as the demo's are)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (4, 20), generator=g)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    for row, (start, end) in enumerate([(15, 20), (4, 7), (6, 9), (2, 4)]):
        mask[row, start:end] = True
        ids[row, end:] = 0  # padding
    return ids, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa", attention.NAME])
@pytest.mark.parametrize("kind", sorted(PACKABLE_MODEL_TYPES))
def test_packed_loss_and_gradients_equal_the_unpacked_ones(kind: str, impl: str) -> None:
    attention.register()
    model = _model(kind)
    model.set_attn_implementation(impl)
    ids, mask = _instruction_batch()
    packed = pack_rows(ids, mask)
    assert packed is not None and packed.ids.shape[0] == 2  # 20 | 9 + 7 + 4
    grads = []
    losses = []
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        total, n = target_loss(model, ids, mask, False, pack=pack)
        (total / n).backward()
        losses.append((float(total.detach()), n))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert losses[0][1] == losses[1][1] == int(mask[:, 1:].sum())
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_packing_without_positions_would_mix_examples() -> None:
    """The check above can fail: the packed rows with a plain causal mask (no positions) differ."""
    model = _model("llama")
    ids, mask = _instruction_batch()
    ref, _ = target_loss(model, ids, mask, False)
    packed = pack_rows(ids, mask)
    assert packed is not None
    mixed, _ = target_loss(model, packed.ids, packed.mask, False)
    assert abs(float(mixed) - float(ref)) > 1e-3


def test_packed_rows_are_built_on_the_models_device() -> None:
    """The packed ids, mask and positions are made where the batch is (a host tensor would raise
    on the strict device, as on a GPU: tests/strict_device.py)."""
    model = _model("llama")
    ids, mask = _instruction_batch()
    want, n = target_loss(model, ids, mask, False, pack=True)
    with strict_device() as dev:
        model.to(dev)
        try:
            got, m = target_loss(model, ids, mask, False, pack=True)
        finally:
            model.to("cpu")
    assert m == n and float(got.to("cpu")) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["train.dp_sgd.noise_multiplier=1.0"], "DP-SGD computes each example's gradient alone"),
        (["adapter.kind=prompt_tuning"], "virtual tokens before each row"),
        (["strategy.name=fedkseed"], "its own client update"),
        (["task=embedding"], "GEM's summary tokens"),
    ],
    ids=["dp_sgd", "prompt_tuning", "fedkseed", "embedding"],
)
def test_what_packing_cannot_serve_is_refused_by_name(overrides: list[str], why: str) -> None:
    from conftest import ROOT
    from fedtune.config import load_config
    from fedtune.errors import ConfigError

    with pytest.raises((ConfigError, ValueError)) as err:
        load_config(ROOT / "configs" / "tiny.yaml", ["train.packing=true", *overrides])
    assert "train.packing" in str(err.value) and why in str(err.value)


def test_a_model_type_whose_packed_mask_is_not_checked_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import ROOT
    from fedtune import components
    from fedtune.config import load_config

    (tmp_path / "config.json").write_text('{"model_type": "opt", "max_position_embeddings": 2048}')
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.packing=true"])
    (problem,) = components.model_limit_problems(cfg, str(tmp_path))
    assert problem.field == "train.packing" and "'opt'" in problem.constraint
    assert (
        components.model_limit_problems(
            cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": False})}), str(tmp_path)
        )
        == []
    )

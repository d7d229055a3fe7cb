"""`model.attention: grouped` against transformers' own eager attention (the reference it replaces)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedtune.models import attention


def tiny_llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=kv_heads,
        head_dim=8,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()  # fedtune trains its frozen base in eval mode (no dropout)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def forward_backward(model: torch.nn.Module, impl: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    (logits * mask[..., None]).square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "build", [lambda: tiny_llama(2), lambda: tiny_llama(6), tiny_gpt2], ids=["llama-gqa", "llama-mha", "gpt2"]
)
def test_grouped_attention_equals_transformers_eager_in_fp32(build: object) -> None:
    attention.register()
    model = build()  # type: ignore[operator]
    ref_logits, ref_grads = forward_backward(model, "eager", torch.float32)
    logits, grads = forward_backward(model, attention.NAME, torch.float32)
    assert torch.allclose(logits, ref_logits, atol=1e-6, rtol=0)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


def test_grouped_attention_under_bf16_autocast_matches_eager_to_bf16_rounding() -> None:
    attention.register()
    model = tiny_llama(2)
    ref_logits, ref_grads = forward_backward(model, "eager", torch.bfloat16)
    logits, grads = forward_backward(model, attention.NAME, torch.bfloat16)
    # the scale 8**-0.5 is not a power of two, so queries and scores round differently: one bf16 ulp
    assert torch.allclose(logits, ref_logits, atol=0.05, rtol=0.02)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=2e-2 * r.abs().max().item(), rtol=0)


def test_grouped_attention_generates_what_eager_generates_with_the_kv_cache() -> None:
    attention.register()
    model = tiny_llama(2)
    ids, mask = batch()
    out = {}
    for impl in ("eager", attention.NAME):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(
            input_ids=ids[:2, :5], attention_mask=mask[:2, :5], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(out["eager"], out[attention.NAME])


def test_grouped_attention_refuses_what_it_does_not_implement() -> None:
    q = torch.randn(1, 2, 3, 4)
    k = v = torch.randn(1, 1, 3, 4)
    with pytest.raises(NotImplementedError, match="softcap.*model.attention: eager"):
        attention.grouped_attention(torch.nn.Module(), q, k, v, None, scaling=0.5, softcap=30.0)
    out, weights = attention.grouped_attention(torch.nn.Module(), q, k, v, None, scaling=0.5, position_ids=None)
    assert out.shape == (1, 3, 2, 4) and weights is None


def test_model_attention_grouped_loads_through_fedtune_and_matches_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from fedtune.config.schema import ModelConfig
    from fedtune.models.load import load_model, tiny_dir

    for interface in (AttentionInterface, AttentionMaskInterface):  # as in a fresh process: load_model registers it
        interface._global_mapping.pop(attention.NAME, None)
    d = str(tiny_dir(ModelConfig(name="tiny"), 0))
    ids, mask = batch()  # token ids < 97: inside the tiny model's vocabulary too
    logits = {}
    for impl in ("eager", attention.NAME):
        model = load_model(d, ModelConfig(name="tiny", attention=impl))  # type: ignore[arg-type]
        assert model.config._attn_implementation == impl
        logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits[attention.NAME], logits["eager"], atol=1e-6, rtol=0)


def test_grouped_attention_takes_a_bias_per_query_head_as_eager_does() -> None:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 5, 4, generator=g)
    k, v = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    bias = torch.randn(2, 6, 5, 5, generator=g)  # differs per head: a wrong grouping of heads shows
    module = torch.nn.Module()
    module.num_key_value_groups = 3  # type: ignore[assignment]
    ref, _ = eager_attention_forward(module.eval(), q, k, v, bias, scaling=0.5)
    out, _ = attention.grouped_attention(module, q, k, v, bias, scaling=0.5)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    with pytest.raises(NotImplementedError, match="one or all 6 heads, this model passes 2"):
        attention.grouped_attention(module, q, k, v, bias[:, :2], scaling=0.5)

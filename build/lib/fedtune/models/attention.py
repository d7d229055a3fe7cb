"""`model.attention: grouped`: eager attention computed once per key/value head group.

transformers' eager attention (`eager_attention_forward` in each model file) repeats every key/value
head for the query heads that share it (`repeat_kv`, a copy forward and a sum backward), scales the
(tokens x tokens) scores rather than the (tokens x head_dim) queries, and runs the softmax on an fp32
copy of the scores that it casts back to the activations' dtype (two more copies forward, two in the
backward, and an fp32 copy saved for it). On a CPU those copies cost more than the matmuls around
them (`bench/throughput.py`). This kernel computes the same attention with the query heads of one
group stacked into one matmul against their shared key, the scale applied to the queries, and the
softmax in the activations' own dtype, which torch's kernels accumulate in fp32 and round once, as
the fp32 path does (in fp32 it equals eager to 1e-6, gradients included; in bf16 it differs only
where the two round differently: tests/unit/test_attention.py).

It is registered under transformers' `AttentionInterface` (and the eager mask under
`AttentionMaskInterface`), the library's extension point for attention kernels, and used through
`attn_implementation`. It implements the plain scaled-dot-product attention of decoder LMs (Llama,
Mistral, Qwen, GPT-2, ...); a model whose attention passes anything more (logit soft-capping,
attention sinks, ...) gets an error naming it instead of a silently different attention.
"""

from __future__ import annotations

from typing import Any

NAME = "grouped"

# keyword arguments transformers' decoder models pass to every attention kernel that do not change
# the attention itself (positions, caching and output flags; sliding windows arrive in the mask)
_IGNORED = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "past_key_values",
        "position_embeddings",
        "sliding_window",
        "is_causal",
    }
)


def grouped_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Scaled dot-product attention of `query` (batch, heads, q_len, dim) over `key`/`value`
    (batch, kv_heads, kv_len, dim) with an additive `attention_mask` (batch, 1 or heads, q_len,
    kv_len); returns (batch, q_len, heads, dim) as transformers' kernels do, and no attention weights."""
    import torch

    extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED)
    if extra:
        raise NotImplementedError(
            f"model.attention: {NAME} implements plain scaled-dot-product attention, but this model's "
            f"attention also passes {', '.join(extra)}; set model.attention: eager (or default)"
        )
    b, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    # query head h belongs to key/value head h // groups (h = kv * groups + g), as repeat_kv assumes
    q = (query * scale).reshape(b, kv_heads, groups * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2))
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]
        if mask.shape[1] == 1:  # one mask for every head: (batch, 1, 1, q_len, kv_len)
            mask = mask[:, :, None]
        elif mask.shape[1] == heads:  # a bias per query head (ALiBi-style), grouped as the queries
            mask = mask.reshape(mask.shape[0], kv_heads, groups, q_len, kv_len)
        else:
            raise NotImplementedError(
                f"model.attention: {NAME} takes a mask for one or all {heads} heads, this model passes "
                f"{mask.shape[1]}; set model.attention: eager (or default)"
            )
        scores = (scores.view(b, kv_heads, groups, q_len, kv_len) + mask).view(b, kv_heads, groups * q_len, kv_len)
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0.0 and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.to(value.dtype), value).view(b, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def kernel_for(name: str, device_type: str) -> str:
    """`model.attention` as a kernel for this device: 'auto' is this kernel on the CPU (it beats
    eager and sdpa there: module docstring) and transformers' choice elsewhere (sdpa's fused GPU
    kernels); any other name is itself."""
    if name != "auto":
        return name
    return NAME if device_type == "cpu" else "default"


def register() -> None:
    """Make `attn_implementation="grouped"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)

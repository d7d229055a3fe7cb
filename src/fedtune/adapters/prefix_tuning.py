"""Prefix tuning through PEFT (Li and Liang, arXiv:2101.00190): every attention layer l gets n
learned key and value vectors K_l, V_l [n, kv heads, head dim] in front of its own, and only
those train:

    attn_l(x) = softmax(q_l(x) [K_l ; k_l(x)]^T / sqrt(d)) [V_l ; v_l(x)]    x at positions n..n+T-1

The prefixes are PEFT's own `PrefixEncoder` from a `PrefixTuningConfig` (no reparametrisation MLP:
`prefix_projection: false`, so the trained table is the prefix itself), laid out as PEFT lays it
out: one row per virtual token of [layers x 2 (key, value) x kv heads x head dim] (the kv heads
of a grouped-query model, as PEFT's `_prepare_prompt_learning_config` sets them). It exports as
PEFT saves prefix tuning (`prompt_embeddings` + the config), which `PeftModel.from_pretrained`
loads.

Not PEFT's wrapper model, for the reason prompt tuning gives (`adapters/prompt_tuning.py`: the
callers' position ids): a forward pre-hook on the model itself puts the prefixes into the key /
value cache of the first (uncached) call, a fresh `DynamicCache` or the empty one a caller
passes (generation keeps it), and extends the caller's 2-D attention mask by n ones and its
positions by n, as PeftModel's forward does; a call on a cache that already holds the prefixes
gets its mask and positions shifted alike. No logits are added, so every caller's frame is kept.

Not a product of LoRA factors, nothing to merge into a weight: only the FedAvg family aggregates
it (the prefixes are averaged), and there is no merged export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.adapters.base import ADAPTERS, Algebra, InjectContext
from fedtune.adapters.peft_tuner import seeded
from fedtune.adapters.prompt_tuning import PromptLearning, caller_inputs
from fedtune.config.adapters import PrefixTuningAdapterConfig

ENCODER = "fedtune_prefix_encoder"  # the PrefixEncoder's name as a submodule of the model
STATE_KEY = "prompt_embeddings"  # as PEFT saves prefix tuning
CONFIG = "_fedtune_prefix_config"  # the PrefixTuningConfig the injection used (for the export)


def prefix_table(model: nn.Module) -> torch.Tensor:
    encoder: Any = model.get_submodule(ENCODER)
    weight: torch.Tensor = encoder.embedding.weight
    return weight


def prefix_key_values(model: Any, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) [batch, kv heads, n, head dim] from the table [n, L*2*kv*hd]
    (PEFT's layout: the key of layer l at 2l, its value at 2l + 1)."""
    config = model.__dict__[CONFIG]
    table = prefix_table(model).to(model.get_input_embeddings().weight.dtype)
    heads = config.num_attention_heads
    kv = table.view(config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # [L*2, batch, heads, n, hd]
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(config.num_layers)]


def _cache_length(past: Any) -> int:
    return int(past.get_seq_length()) if past is not None else 0


def _before(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The caller's inputs -> with the prefixes in the cache, the mask and positions extended."""
    from transformers import DynamicCache

    n = prefix_table(model).shape[0]
    kwargs, batch = caller_inputs(args, kwargs, n, "prefix_tuning", "prefixes")
    past = kwargs.get("past_key_values")
    if _cache_length(past) == 0:  # the first call: the prefixes become the cache's first n positions
        cache = past if past is not None else DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(prefix_key_values(model, batch)):
            cache.update(k, v, layer)
        kwargs["past_key_values"] = cache
    for key in ("position_ids", "cache_position"):  # the caller's frame, shifted past the prefixes
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + n
    return (), kwargs


@ADAPTERS.register("prefix_tuning", "Prefix tuning through PEFT: n learned keys and values before every layer's.")
@dataclass(frozen=True)
class PrefixTuning(PromptLearning):
    """Prefix tuning through PEFT's PrefixEncoder (arXiv:2101.00190): module docstring."""

    options: PrefixTuningAdapterConfig = field(default_factory=PrefixTuningAdapterConfig)

    kind: ClassVar[str] = "prefix_tuning"
    algebra: ClassVar[Algebra] = Algebra.PROMPT
    encoder: ClassVar[str] = ENCODER
    config_key: ClassVar[str] = CONFIG
    trains: ClassVar[str] = "the prefixes"

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PrefixTuningConfig
        from peft.utils.other import _prepare_prompt_learning_config

        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.options.num_virtual_tokens,
            num_transformer_submodules=1,  # a decoder-only model (PeftModel sets the same)
            prefix_projection=False,
        )
        return _prepare_prompt_learning_config(config, model.config)  # layers, kv heads, token dim from the base

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        from peft.tuners.prefix_tuning import PrefixEncoder

        config = self.peft_config(model)
        encoder = seeded(lambda: PrefixEncoder(config), ctx.seed).to(model.get_input_embeddings().weight.device)
        return self.attach(model, encoder, config, ("pre", _before))

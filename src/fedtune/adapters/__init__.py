"""Adapter kinds, one file each, registered by name (importing the modules registers them)."""

from typing import Any

from fedtune.adapters import (
    dora,
    ia3,
    loha,
    lokr,
    lora,
    lora_sb,
    moe_lora,
    prefix_tuning,
    prompt_tuning,
    rm_lora,
    smore,
    vera,
)
from fedtune.adapters.base import ADAPTERS, Adapter, Algebra, adapter_input, adapter_of

# every kind, typed as the contract: mypy checks each class against the Adapter protocol
KINDS: tuple[type[Adapter], ...] = (lora.LoRA, lora_sb.LoraSB, moe_lora.MoELoRA, rm_lora.RMLoRA, smore.SMoRE)
KINDS += (dora.DoRA, vera.VeRA, ia3.IA3, loha.LoHa, lokr.LoKr, prompt_tuning.PromptTuning, prefix_tuning.PrefixTuning)

__all__ = ["ADAPTERS", "Adapter", "Algebra", "adapter_input", "adapter_of", "build_adapter"]


def build_adapter(options: Any) -> Adapter:
    """The adapter of `options.kind` (the config's `adapter` section), holding those options."""
    cls: Any = ADAPTERS.get(options.kind)
    adapter: Adapter = cls(options=options)
    return adapter

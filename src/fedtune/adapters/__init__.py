"""Adapter kinds, one file each, registered by name (importing the modules registers them)."""

from typing import Any

from fedtune.adapters import lora, lora_sb, moe_lora  # noqa: F401
from fedtune.adapters.base import ADAPTERS, Adapter, Algebra, adapter_input, adapter_of

__all__ = ["ADAPTERS", "Adapter", "Algebra", "adapter_input", "adapter_of", "build_adapter"]


def build_adapter(options: Any) -> Any:
    """The adapter of `options.kind` (the config's `adapter` section), holding those options."""
    cls: Any = ADAPTERS.get(options.kind)
    return cls(options=options)

"""What the PEFT-backed kinds share (DoRA, VeRA, IA3, LoHa, LoKr): PEFT's own code injects the
method from a `peft` config (nothing re-implemented here), the trainable tensors are named as
`PeftModel.save_pretrained` names them (the adapter name 'default' removed), and the export is
that config plus those tensors, which `PeftModel.from_pretrained` loads.

A kind is a subclass naming its `marker` (the substring of its trainable tensors' names), its
algebra, and the `peft_config` its options give.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedtune.adapters.base import KIND_MARK, AdapterBase, InjectContext
from fedtune.adapters.lora import PEFT_PREFIX, write_peft_dir
from fedtune.types import AdapterState

ADAPTER_NAME = "default"  # PEFT's adapter name; removed from state keys as PEFT's own save does


def peft_key(name: str) -> str:
    """A parameter's name as PEFT's saved state names it: 'q.ia3_l.default' -> 'q.ia3_l',
    'q.lora_A.default.weight' -> 'q.lora_A.weight', DoRA's 'q.lora_magnitude_vector.default.weight'
    -> 'q.lora_magnitude_vector'."""
    key = name.replace(f".{ADAPTER_NAME}", "")
    return key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def resolve_targets(targets: Any, model_type: str, mapping: Mapping[str, Sequence[str]]) -> Any:
    """'auto': PEFT's default target modules of the method for this architecture (explicit in the
    export); a list or 'all-linear' as given."""
    if targets == "auto":
        return list(mapping.get(model_type, [])) or "all-linear"
    return targets


def seeded(fn: Any, seed: int) -> Any:
    """fn() with torch's global generator at `seed` (PEFT's inits draw from it), restored after."""
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return fn()
    finally:
        torch.random.set_rng_state(saved)


@dataclass(frozen=True)
class PeftTuner(AdapterBase):
    """A PEFT method injected by PEFT (module docstring); subclasses give `marker` and `peft_config`."""

    marker: ClassVar[str]  # substring of the names of the method's trainable tensors

    def peft_config(self, model_type: str, seed: int) -> Any:
        """The `peft` config of these options for an architecture (`seed`: any seeded draw)."""
        raise NotImplementedError

    def add_to(self, model: Any, config: Any) -> Any:
        """Inject with PEFT's functional API (only the method's tensors train)."""
        from peft import inject_adapter_in_model

        return inject_adapter_in_model(config, model)

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        config = self.peft_config(ctx.model_type, ctx.seed)
        model = seeded(lambda: self.add_to(model, config), ctx.seed)
        model.__dict__[KIND_MARK] = self.kind
        return model

    def parameters(self, model: Any) -> dict[str, torch.nn.Parameter]:
        return {peft_key(n): p for n, p in model.named_parameters() if self.marker in n}

    def scale(self, model: Any) -> float:
        """The method's own scale (alpha / r for LoHa, LoKr), 1 where it has none (VeRA, IA3)."""
        for m in model.modules():
            scaling = getattr(m, "scaling", None)
            if isinstance(scaling, dict) and ADAPTER_NAME in scaling:
                return float(scaling[ADAPTER_NAME])
        return 1.0

    def shared_tensors(self, model: Any) -> AdapterState:
        """Tensors the export needs that never travel (VeRA's frozen projections), keyed as saved."""
        return {}

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        """PEFT format, with the config the model was injected with (`peft_config`, the engine's
        LoRA config, is not this method's)."""
        tensors = {**{PEFT_PREFIX + k: v for k, v in state.items()}, **self.shared_tensors(model)}
        return write_peft_dir(tensors, model.peft_config[ADAPTER_NAME], base_model, out_dir)

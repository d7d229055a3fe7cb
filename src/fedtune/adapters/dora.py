"""DoRA through PEFT (Liu et al., arXiv:2402.09353): LoRA with `use_dora`, PEFT's own layers.

    W' = m * (W + s * B @ A) / ||W + s * B @ A||_row,   m: [d] (`<module>.lora_magnitude_vector`)

(the norm of each output row of the [d, k] weight, as PEFT computes it; m starts at ||W||_row, B
at zero, so W' = W at init). The update is not s * B @ A: averaging the factors or their products
(FLoRA, FedEx-LoRA, ...) ignores the normalisation, so DoRA declares its own algebra and only the
FedAvg family aggregates it (its A, B and m are averaged like any trainable state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedtune.adapters.base import ADAPTERS, KIND_MARK, Algebra, InjectContext
from fedtune.adapters.lora import LoRA, export_peft, inject_, lora_config
from fedtune.adapters.peft_tuner import peft_key
from fedtune.config.adapters import DoraAdapterConfig
from fedtune.types import AdapterState


@ADAPTERS.register("dora", "DoRA through PEFT: m * (W + s B A) / ||W + s B A||, a magnitude per output row.")
@dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA through PEFT (arXiv:2402.09353): LoRA's factors plus a magnitude vector per module."""

    options: DoraAdapterConfig = field(default_factory=DoraAdapterConfig)  # type: ignore[assignment]

    kind: ClassVar[str] = "dora"
    algebra: ClassVar[Algebra] = Algebra.DORA

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        model = inject_(model, dora_config(self.options, ctx.model_type), ctx.seed)
        model.__dict__[KIND_MARK] = self.kind
        return model

    def parameters(self, model: Any) -> dict[str, torch.nn.Parameter]:
        return {peft_key(n): p for n, p in model.named_parameters() if "lora_" in n}

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        return export_peft(state, model.peft_config["default"], base_model, out_dir)


def dora_config(options: Any, model_type: str) -> Any:
    """PEFT's LoraConfig of these options with use_dora (DoRA has no per-client ranks)."""
    config = lora_config(options, model_type)
    config.use_dora = True
    return config

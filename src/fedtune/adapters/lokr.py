"""LoKr through PEFT (Yeh et al., LyCORIS, arXiv:2309.14859), PEFT's own layers:

    dW = (alpha / r) * W1 ⊗ W2,   W1: [d1, k1] (`lokr_w1`), W2: [d2, k2] (`lokr_w2`), d1 d2 = d, k1 k2 = k

a Kronecker product (W2 itself low-rank, `lokr_w2_a @ lokr_w2_b`, when r is below its size). Not
s * B @ A: only the FedAvg family aggregates it (its factors are averaged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedtune.adapters.base import ADAPTERS, Algebra
from fedtune.adapters.peft_tuner import PeftTuner, resolve_targets
from fedtune.config.adapters import LoKrAdapterConfig


@ADAPTERS.register("lokr", "LoKr through PEFT: (alpha / r) W1 kron W2, a Kronecker product.")
@dataclass(frozen=True)
class LoKr(PeftTuner):
    """LoKr through PEFT (arXiv:2309.14859)."""

    options: LoKrAdapterConfig = field(default_factory=LoKrAdapterConfig)

    kind: ClassVar[str] = "lokr"
    algebra: ClassVar[Algebra] = Algebra.OTHER
    marker: ClassVar[str] = "lokr_"

    def peft_config(self, model_type: str, seed: int) -> Any:
        from peft import LoKrConfig
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING as TARGETS

        return LoKrConfig(
            r=self.options.r,
            alpha=self.options.alpha,  # type: ignore[arg-type]  # peft types it int; a float works
            rank_dropout=self.options.dropout,
            decompose_factor=self.options.decompose_factor,
            target_modules=resolve_targets(self.options.target_modules, model_type, TARGETS),
        )

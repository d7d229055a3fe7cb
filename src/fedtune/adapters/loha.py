"""LoHa through PEFT (Hyeon-Woo et al., FedPara, arXiv:2108.06098), PEFT's own layers:

    dW = (alpha / r) * (B1 @ A1) ⊙ (B2 @ A2),   B_i: [d, r] (`hada_w{i}_a`), A_i: [r, k] (`hada_w{i}_b`)

a Hadamard product of two rank-r products (rank up to r^2). Not s * B @ A: only the FedAvg family
aggregates it (each factor is averaged, which is FedPara's own federated scheme).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedtune.adapters.base import ADAPTERS, Algebra
from fedtune.adapters.peft_tuner import PeftTuner, resolve_targets
from fedtune.config.adapters import LoHaAdapterConfig


@ADAPTERS.register("loha", "LoHa through PEFT: (alpha / r) (B1 A1) * (B2 A2), a Hadamard product of low-rank factors.")
@dataclass(frozen=True)
class LoHa(PeftTuner):
    """LoHa through PEFT (arXiv:2108.06098)."""

    options: LoHaAdapterConfig = field(default_factory=LoHaAdapterConfig)

    kind: ClassVar[str] = "loha"
    algebra: ClassVar[Algebra] = Algebra.OTHER
    marker: ClassVar[str] = "hada_"

    def peft_config(self, model_type: str, seed: int) -> Any:
        from peft import LoHaConfig
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING as TARGETS

        return LoHaConfig(
            r=self.options.r,
            alpha=self.options.alpha,  # type: ignore[arg-type]  # peft types it int; a float works
            rank_dropout=self.options.dropout,
            target_modules=resolve_targets(self.options.target_modules, model_type, TARGETS),
        )

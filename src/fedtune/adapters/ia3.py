"""(IA)^3 through PEFT (Liu et al., arXiv:2205.05638), PEFT's own layers: a learned vector l per
target scales activations elementwise,

    attention targets (k, v):     h = l * (W x),   l: [d_out]
    feed-forward targets (down):  h = W (l * x),   l: [d_in]    (`<module>.ia3_l`, starts at 1)

Not a product of LoRA factors: only the FedAvg family aggregates it (the vectors are averaged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedtune.adapters.base import ADAPTERS, Algebra, no_dropout
from fedtune.adapters.peft_tuner import PeftTuner, resolve_targets
from fedtune.config.adapters import IA3AdapterConfig
from fedtune.errors import Problem


@ADAPTERS.register("ia3", "(IA)^3 through PEFT: learned vectors scale activations elementwise.")
@dataclass(frozen=True)
class IA3(PeftTuner):
    """(IA)^3 through PEFT (arXiv:2205.05638)."""

    options: IA3AdapterConfig = field(default_factory=IA3AdapterConfig)

    kind: ClassVar[str] = "ia3"
    algebra: ClassVar[Algebra] = Algebra.OTHER
    marker: ClassVar[str] = "ia3_l"

    def peft_config(self, model_type: str, seed: int) -> Any:
        from peft import IA3Config
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

        targets = resolve_targets(self.options.target_modules, model_type, TARGETS)
        ff = self.options.feedforward_modules
        if ff == "auto":
            listed = set(targets) if isinstance(targets, list) else set()
            ff = [m for m in FEEDFORWARD.get(model_type, []) if m in listed]
        return IA3Config(target_modules=targets, feedforward_modules=ff, fan_in_fan_out=model_type == "gpt2")

    def problems(self, *, dp: bool, dp_sgd: bool) -> list[Problem]:
        return no_dropout(self.options.dropout, "(IA)^3 has no dropout: its vectors scale activations directly")

"""VeRA through PEFT (Kopiczko et al., arXiv:2310.11454), PEFT's own layers:

    h = W x + diag(b) @ B @ diag(d) @ A @ x,   A: [r, k], B: [d_out, r] frozen random;
    b: [d_out] (`<module>.vera_lambda_b`, starts at 0), d: [r] (`<module>.vera_lambda_d`, d_initial)

A and B are drawn once from PEFT's `projection_prng_key`, set to the run's adapter seed, so every
party (server and each client, in-process or on Flower) builds the same matrices; they are buffers,
never in the adapter state, so they never travel. Only b and d train and travel; FedAvg-family
strategies average them. The export carries A and B (`save_projection`) so PEFT needs no key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedtune.adapters.base import ADAPTERS, Algebra
from fedtune.adapters.peft_tuner import ADAPTER_NAME, PeftTuner, resolve_targets
from fedtune.config.adapters import VeraAdapterConfig
from fedtune.types import AdapterState


@ADAPTERS.register("vera", "VeRA through PEFT: diag(b) B diag(d) A, A and B frozen, shared and seeded.")
@dataclass(frozen=True)
class VeRA(PeftTuner):
    """VeRA through PEFT (arXiv:2310.11454): only the scaling vectors b, d train and travel."""

    options: VeraAdapterConfig = field(default_factory=VeraAdapterConfig)

    kind: ClassVar[str] = "vera"
    algebra: ClassVar[Algebra] = Algebra.VERA
    marker: ClassVar[str] = "vera_lambda_"

    def peft_config(self, model_type: str, seed: int) -> Any:
        from peft import VeraConfig
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as TARGETS

        return VeraConfig(
            r=self.options.r,
            target_modules=resolve_targets(self.options.target_modules, model_type, TARGETS),
            projection_prng_key=seed,
            save_projection=True,
            vera_dropout=self.options.dropout,
            d_initial=self.options.d_initial,
            fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores weights as Conv1D (in x out)
        )

    def add_to(self, model: Any, config: Any) -> Any:
        """VeRA's shared matrices live on PEFT's tuner (so PEFT's functional API refuses VeRA);
        its layers hold them too, so the tuner's model is the injected model. PEFT gives A and B the
        base's dtype; they are kept in fp32 like the trained vectors b, d (on a bf16 base a forward
        without autocast cast the input to d's fp32 and then met a bf16 A; the same failure as
        huggingface/peft issue #1872), and autocast runs the products in bf16 where it is on."""
        from peft.tuners.vera import VeraModel

        model = VeraModel(model, config, ADAPTER_NAME).model
        for m in model.modules():
            for buffers in (getattr(m, "vera_A", None), getattr(m, "vera_B", None)):
                if buffers is not None and buffers[ADAPTER_NAME].dtype != torch.float32:
                    buffers[ADAPTER_NAME] = buffers[ADAPTER_NAME].float()  # shared by the layers: cast once
        return model

    def shared_tensors(self, model: Any) -> AdapterState:
        """The frozen A, B, keyed as PeftModel.save_pretrained writes them."""
        layer = next(m for m in model.modules() if hasattr(m, "vera_lambda_b"))
        return {
            "base_model.vera_A": layer.vera_A[ADAPTER_NAME].detach().cpu().float(),
            "base_model.vera_B": layer.vera_B[ADAPTER_NAME].detach().cpu().float(),
        }

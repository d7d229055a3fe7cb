"""What fedtune runs only on a CUDA GPU: a quantized frozen base (QLoRA) and fused kernels.

- `model.quantize: 4bit | 8bit` loads the frozen base through bitsandbytes (transformers'
  `BitsAndBytesConfig`: 4-bit NF4 with double quantization and bf16 compute, as in QLoRA,
  arXiv:2305.14314; or LLM.int8()); the adapters stay fp32 master weights and train as on an
  unquantized base. bitsandbytes' kernels are CUDA kernels, so a quantized base is refused on a
  CPU by name, and so is a strategy that writes offsets into the base weights (FLoRA, FedEx-LoRA,
  full-weight FedKSeed): a quantized weight cannot hold a small offset.
- `model.kernels: liger` patches the model with Liger's Triton kernels (RMSNorm, RoPE, SwiGLU;
  not the fused linear cross-entropy, because fedtune computes its masked loss from the logits);
  `auto` does so on a CUDA device when `liger-kernel` is installed and supports the architecture,
  and keeps transformers' kernels elsewhere. Triton needs a GPU: `liger` on a CPU is refused.

Both libraries come with the `gpu` extra (`pip install 'fedtune[gpu]'`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from fedtune.errors import ModelError, Problem

GPU_EXTRA = "pip install 'fedtune[gpu]' (bitsandbytes, liger-kernel)"
LIGER_PATCHES = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def quantize_problems(quantize: str, device_type: str, offsets_reason: str | None) -> list[Problem]:
    """Why `model.quantize` cannot be used for this run (device, strategy, missing library)."""
    if quantize == "none":
        return []
    out = []
    if device_type != "cuda":
        out.append(
            Problem(
                "model.quantize",
                quantize,
                f"a bitsandbytes-quantized base runs on a CUDA GPU, and this run's device is {device_type}",
                "set model.quantize: none (a bf16 base, model.dtype: auto, halves the memory where bf16 is native)",
            )
        )
    if offsets_reason is not None:
        out.append(
            Problem(
                "model.quantize",
                quantize,
                f"{offsets_reason}, and a quantized weight cannot hold a small offset",
                "set model.quantize: none, or use a strategy that leaves the base weights alone (fedavg, ffa, ...)",
            )
        )
    if not installed("bitsandbytes"):
        out.append(Problem("model.quantize", quantize, "bitsandbytes is not installed", GPU_EXTRA))
    return out


def kernels_problems(kernels: str, device_type: str) -> list[Problem]:
    """Why `model.kernels` cannot be used on this device."""
    if kernels != "liger":
        return []
    if device_type != "cuda":
        why = f"Liger's kernels are Triton kernels for a GPU, and this run's device is {device_type}"
        return [Problem("model.kernels", kernels, why, "set model.kernels: auto (transformers' kernels here)")]
    if not installed("liger_kernel"):
        return [Problem("model.kernels", kernels, "liger-kernel is not installed", GPU_EXTRA)]
    return []


def quantization_config(quantize: str) -> Any:
    """transformers' `BitsAndBytesConfig` for `model.quantize` (None for 'none')."""
    if quantize == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def apply_kernels_(model: Any, kernels: str, device_type: str) -> str:
    """Patch `model` with Liger's kernels where chosen ('auto': on CUDA when installed and the
    architecture is supported); return the kernels in use, for the records."""
    if kernels == "default" or device_type != "cuda" or not installed("liger_kernel"):
        return "transformers"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if kernels == "liger":
            raise ModelError(
                f"model.kernels: liger has no kernels for model type {model.config.model_type!r}; "
                "set model.kernels: auto"
            )
        return "transformers"
    _apply_liger_kernel_to_instance(model=model, **LIGER_PATCHES)
    return "liger"

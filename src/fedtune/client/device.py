"""Where a local step runs and in what precision: the model's device, and bf16 autocast there."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(
    bf16: bool, device: torch.device | str = "cpu", model: Any = None
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the device's type (cpu or cuda); a no-op when off. Given the `model`, its PEFT
    layers also leave their input's dtype alone (PEFT's `disable_input_dtype_casting`): by default a
    LoRA layer casts its bf16 input to the fp32 adapter's dtype, and autocast casts it straight back
    to bf16 for the matmul, an exact round trip that only copies (about 5 % of a bf16 step of
    SmolLM2-135M with LoRA on q, v; BENCHMARKS.md)."""
    if not bf16:
        return contextlib.nullcontext()
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16))
    if model is not None:
        from peft.helpers import disable_input_dtype_casting

        stack.enter_context(disable_input_dtype_casting(model))
    return stack


def model_device(model: Any) -> torch.device:
    """Where the model's weights are (batches built on the CPU move there)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")

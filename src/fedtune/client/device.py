"""Where a local step runs and in what precision: the model's device, and bf16 autocast there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

MISSING = object()


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
        stack.enter_context(input_casting_off(model))
    return stack


@contextlib.contextmanager
def input_casting_off(model: Any) -> Iterator[None]:
    """PEFT's `disable_input_dtype_casting` for every PEFT layer: PEFT 0.21's helper reads
    `cast_input_dtype_enabled` from each layer, which its IA3 and VeRA layers never set (their
    `_cast_input_dtype` defaults it to on), so it raised AttributeError on them (a fix upstream,
    huggingface/peft PR #3439, was closed unmerged). Restores each layer as it was (the attribute
    removed where it was absent)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: list[Any] = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m.__dict__.get("cast_input_dtype_enabled", MISSING) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            if was is MISSING:
                del m.cast_input_dtype_enabled
            else:
                m.cast_input_dtype_enabled = was


def model_device(model: Any) -> torch.device:
    """Where the model's weights are (batches built on the CPU move there)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")

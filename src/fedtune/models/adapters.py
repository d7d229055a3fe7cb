"""Adapter operations on an injected model, whatever its kind (each kind's own code is in
`fedtune.adapters`): get and set the state that travels, base-weight offsets, what trains."""

from __future__ import annotations

from typing import Any

import torch

from fedtune.adapters import ADAPTERS, adapter_of
from fedtune.adapters.lora import BASE_DELTA as BASE_DELTA
from fedtune.adapters.lora import PEFT_PREFIX as PEFT_PREFIX
from fedtune.adapters.lora import crop_to as crop_to
from fedtune.adapters.lora import export_peft as export_peft
from fedtune.adapters.lora import fold_base_deltas as fold_base_deltas
from fedtune.adapters.lora import inject_ as inject_
from fedtune.adapters.lora import lora_config as lora_config
from fedtune.adapters.lora import pad_to as pad_to
from fedtune.adapters.lora import split_state
from fedtune.types import AdapterState

# shared frozen tensors of every kind: never trained, never sent back
FROZEN_SUFFIXES = tuple(s for kind in ADAPTERS for s in ADAPTERS.get(kind).frozen_suffixes)


def get_state(model: Any) -> AdapterState:
    """The adapter tensors (PEFT names without the adapter name), detached fp32 CPU copies."""
    return adapter_of(model).state(model)


def set_state_(model: Any, state: AdapterState) -> None:
    """Load adapter tensors into `model` in place (padded to the model's rank), and set the base
    weights to W0 + base_delta for modules with a `.base_delta` (W0 restored for the others)."""
    lora, base = split_state(state)
    adapter = adapter_of(model)
    params = adapter.parameters(model)
    unknown = [k for k in lora if k not in params]
    if unknown:
        raise KeyError(f"adapter keys not in the model: {unknown[:5]}")
    adapter.load_(model, lora)
    apply_base_deltas_(model, base)


@torch.no_grad()
def apply_base_deltas_(model: Any, deltas: AdapterState) -> None:
    """W = W0 + delta for each module prefix in `deltas`; any module offset earlier and not in
    `deltas` goes back to W0. W0 copies are kept on the model (only for offset modules)."""
    pristine: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedtune_w0", {})
    active: set[str] = model.__dict__.setdefault("_fedtune_offset", set())
    modules = dict(model.named_modules())
    for prefix in sorted(active - set(deltas)):
        modules[prefix].base_layer.weight.copy_(pristine[prefix])
        active.discard(prefix)
    for prefix, delta in deltas.items():
        layer = modules[prefix]
        weight = layer.base_layer.weight
        if prefix not in pristine:
            pristine[prefix] = weight.detach().clone()
        d = delta.T if getattr(layer, "fan_in_fan_out", False) else delta  # Conv1D stores [in, out]
        weight.copy_(pristine[prefix] + d.to(weight.device, weight.dtype))
        active.add(prefix)


def lora_scale(model: Any) -> float:
    """The scale s of the injected adapter's update (alpha / r; 1 for LoRA-SB)."""
    return float(adapter_of(model).scale(model))


def adapter_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters keyed like the adapter state."""
    return adapter_of(model).parameters(model)


def trainable_keys(state: AdapterState) -> list[str]:
    """Keys a client trains and returns: not base offsets, not frozen shared factors (LoRA-SB A, B)."""
    return [k for k in state if not k.endswith(BASE_DELTA) and not k.endswith(FROZEN_SUFFIXES)]


def select_trainable_(model: Any, keys: Any) -> list[torch.nn.Parameter]:
    """Train exactly the adapter tensors named in `keys` (a client trains what it receives:
    FFA-LoRA sends only B, so A stays the shared frozen init); return them in key order."""
    params = adapter_parameters(model)
    wanted = set(trainable_keys(dict.fromkeys(keys)))  # type: ignore[arg-type]
    missing = wanted - set(params)
    if missing:
        raise KeyError(f"adapter keys not in the model: {sorted(missing)[:5]}")
    for k, p in params.items():
        p.requires_grad_(k in wanted)
    return [params[k] for k in sorted(wanted)]


def trainable_parameter_count(model: Any) -> int:
    """Elements of the adapter tensors a client trains (not shared frozen ones): the number that
    equal-budget comparisons of adapter kinds match, recorded in round 0."""
    params: dict[str, Any] = adapter_parameters(model)
    return sum(int(params[k].numel()) for k in trainable_keys(params))

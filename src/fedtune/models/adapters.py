"""Adapters through PEFT's public functional API: inject, get and set adapter state, export."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedtune.config.schema import AdapterConfig
from fedtune.types import AdapterState

PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the same tensors


def lora_config(cfg: AdapterConfig, model_type: str, r: int | None = None) -> Any:
    """A peft LoraConfig; target modules resolved per architecture ('auto') so exports are explicit."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    targets: Any = cfg.target_modules
    if targets == "auto":
        targets = list(TARGETS.get(model_type, [])) or "all-linear"
    rank = r if r is not None else cfg.r
    return LoraConfig(
        r=rank,
        lora_alpha=cfg.alpha * rank / cfg.r if r is not None else cfg.alpha,  # keep the scale s = alpha/r
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores weights as Conv1D (in x out)
    )


def inject_(model: Any, config: Any, seed: int) -> Any:
    """Add the adapter to `model` in place (A initialised from `seed`); only adapter params train."""
    from peft import inject_adapter_in_model

    saved_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, model)
    torch.random.set_rng_state(saved_rng)
    return model


def get_state(model: Any) -> AdapterState:
    """The adapter tensors (PEFT names without the adapter name), detached fp32 CPU copies."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def set_state_(model: Any, state: AdapterState) -> None:
    """Load adapter tensors into `model` in place; every key must match."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"adapter keys not in the model: {unexpected[:5]}")


def adapter_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters keyed like the adapter state (the adapter name 'default' removed)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            out[name.replace(".default", "")] = p
    return out


def select_trainable_(model: Any, keys: Any) -> list[torch.nn.Parameter]:
    """Train exactly the adapter tensors named in `keys` (a client trains what it receives:
    FFA-LoRA sends only B, so A stays the shared frozen init); return them in key order."""
    params = adapter_parameters(model)
    wanted = set(keys)
    missing = wanted - set(params)
    if missing:
        raise KeyError(f"adapter keys not in the model: {sorted(missing)[:5]}")
    for k, p in params.items():
        p.requires_grad_(k in wanted)
    return [params[k] for k in sorted(wanted)]


def export_peft(state: AdapterState, config: Any, base_model: str, out_dir: str | Path) -> Path:
    """Write a PEFT-format adapter dir that `PeftModel.from_pretrained(base, out_dir)` loads."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    cfg = config.to_dict()
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), set):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=_json_default))
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, set):
        return sorted(o)
    if hasattr(o, "value"):
        return o.value
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)

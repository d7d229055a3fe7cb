"""Adapters through PEFT's public functional API: inject, get and set adapter state, export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fedtune.adapters.lora_sb import FROZEN_SUFFIXES as SB_FROZEN
from fedtune.adapters.lora_sb import SB_R, is_lora_sb, sb_parameters, sb_to_lora
from fedtune.adapters.moe_lora import FROZEN_ROUTER, is_moe, moe_parameters
from fedtune.config.schema import AdapterConfig
from fedtune.files import temp_dir, write_safetensors
from fedtune.types import AdapterState

FROZEN_SUFFIXES = (*SB_FROZEN, FROZEN_ROUTER)  # shared frozen tensors: never trained, never sent back
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
        lora_alpha=cfg.alpha * rank / cfg.r if r is not None else cfg.alpha,  # type: ignore[arg-type]  # s = alpha/r
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

    if is_moe(model):
        sd = moe_parameters(model)
    else:
        sd = sb_parameters(model) if is_lora_sb(model) else get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


BASE_DELTA = ".base_delta"  # a dense [out, in] offset to a frozen base weight (FedEx, FLoRA merges)


def split_state(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(trainable adapter tensors, base-weight offsets keyed by module prefix)."""
    lora = {k: v for k, v in state.items() if not k.endswith(BASE_DELTA)}
    base = {k[: -len(BASE_DELTA)]: v for k, v in state.items() if k.endswith(BASE_DELTA)}
    return lora, base


def pad_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero-pad a [r_k, k] or [d, r_k] factor to the model's max rank (heterogeneous ranks).

    A rank-r_k LoRA inside a rank-r_max one is exact: the padded rows of A and columns of B get
    zero gradients (each multiplies the other's zeros), so they stay zero under AdamW."""
    if t.shape == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def crop_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)]


def set_state_(model: Any, state: AdapterState) -> None:
    """Load adapter tensors into `model` in place (padded to the model's rank), and set the base
    weights to W0 + base_delta for modules with a `.base_delta` (W0 restored for the others)."""
    from peft import set_peft_model_state_dict

    lora, base = split_state(state)
    params = adapter_parameters(model)
    unknown = [k for k in lora if k not in params]
    if unknown:
        raise KeyError(f"adapter keys not in the model: {unknown[:5]}")
    if is_lora_sb(model) or is_moe(model):
        with torch.no_grad():
            for k, v in lora.items():
                params[k].copy_(v)
    else:
        set_peft_model_state_dict(model, {k: pad_to(v, params[k].shape) for k, v in lora.items()})
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
    """The LoRA scale s = alpha / r of the injected adapter (1 for LoRA-SB)."""
    if is_lora_sb(model):
        return 1.0
    if is_moe(model):
        info = model.__dict__["_fedtune_moe"]
        return float(info["alpha"] / info["r"])
    for m in model.modules():
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            return float(scaling["default"])
    raise ValueError("model has no LoRA adapter")


def adapter_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters keyed like the adapter state (the adapter name 'default' removed)."""
    if is_lora_sb(model):
        return sb_parameters(model)
    if is_moe(model):
        return moe_parameters(model)
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            out[name.replace(".default", "")] = p
    return out


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


def fold_base_deltas(state: AdapterState, scale: float) -> tuple[AdapterState, int | None]:
    """Express base_delta + s*B@A exactly as one LoRA of scale 1 (exact SVD, cut at the numerical
    rank shared by all modules), so strategies that merge into the base still export to PEFT."""
    lora, base = split_state(state)
    if not base:
        return lora, None
    dense = {}
    for m, d in base.items():
        dense[m] = d.double() + scale * lora[m + ".lora_B.weight"].double() @ lora[m + ".lora_A.weight"].double()
    svds = {m: torch.linalg.svd(w, full_matrices=False) for m, w in dense.items()}
    rank = max(1, max(int((s > max(float(s[0]), 1e-30) * 1e-7).sum()) for _, s, _ in svds.values()))
    out: AdapterState = {}
    for m, (u, s, vh) in svds.items():
        root = s[:rank].sqrt()  # a module of smaller full rank is zero-padded to the shared rank
        out[m + ".lora_A.weight"] = pad_to((root[:, None] * vh[:rank]).float(), torch.Size([rank, vh.shape[1]]))
        out[m + ".lora_B.weight"] = pad_to((u[:, :rank] * root[None, :]).float(), torch.Size([u.shape[0], rank]))
    return out, rank


def export_peft(state: AdapterState, config: Any, base_model: str, out_dir: str | Path) -> Path:
    """Write a PEFT-format adapter dir that `PeftModel.from_pretrained(base, out_dir)` loads.

    Base-weight offsets (FedEx-LoRA, FLoRA) are folded exactly into a LoRA of larger rank."""
    import copy

    if any(k.endswith(SB_R) for k in state):  # LoRA-SB: B (R A) is an ordinary LoRA of scale 1
        state = sb_to_lora(state)
        config = copy.deepcopy(config)
        config.lora_alpha = float(config.r)
    state, folded_rank = fold_base_deltas(state, config.lora_alpha / config.r)
    if folded_rank is not None:
        config = copy.deepcopy(config)
        config.r, config.lora_alpha = folded_rank, float(folded_rank)  # scale 1
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}-")
    cfg = config.to_dict()
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), set):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=_json_default))
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in state.items()}
    write_safetensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
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

"""LoRA through PEFT's functional API (Hu et al., arXiv:2106.09685):

    dW = s * B @ A,   A: [r, k] (`<module>.lora_A.weight`), B: [d, r] (`<module>.lora_B.weight`), s = alpha / r.

A is drawn from a seed, B starts at zero. Clients with their own rank r_k (FLoRA, FlexLoRA,
HetLoRA) train inside a model of the largest rank: a rank-r_k LoRA zero-padded to r_max is the
same update. Exported in PEFT format; base-weight offsets (FedEx-LoRA, FLoRA merges) are folded
exactly into a LoRA of larger rank first.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedtune.adapters.base import ADAPTERS, AdapterBase, Algebra, InjectContext, detached
from fedtune.config.adapters import AdapterOptions, LoraAdapterConfig
from fedtune.files import temp_dir, write_safetensors
from fedtune.types import AdapterState

PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the same tensors
BASE_DELTA = ".base_delta"  # a dense [out, in] offset to a frozen base weight (FedEx, FLoRA merges)


def lora_config(cfg: AdapterOptions, model_type: str, r: int | None = None) -> Any:
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
    state, folded_rank = fold_base_deltas(state, config.lora_alpha / config.r)
    if folded_rank is not None:
        config = copy.deepcopy(config)
        config.r, config.lora_alpha = folded_rank, float(folded_rank)  # scale 1
    return write_peft_dir({PEFT_PREFIX + k: v for k, v in state.items()}, config, base_model, out_dir)


def write_peft_dir(tensors: AdapterState, config: Any, base_model: str, out_dir: str | Path) -> Path:
    """Write `tensors` (keyed as PeftModel.save_pretrained names them) and the peft `config` as a
    PEFT adapter dir, atomically (any PEFT method: LoRA, DoRA, VeRA, IA3, LoHa, LoKr)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}-")
    cfg = config.to_dict()
    cfg["base_model_name_or_path"] = base_model
    for name in ("target_modules", "feedforward_modules"):
        if isinstance(cfg.get(name), set):
            cfg[name] = sorted(cfg[name])
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=_json_default))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
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


@ADAPTERS.register("lora", "LoRA through PEFT: dW = (alpha / r) B A (the default).")
@dataclass(frozen=True)
class LoRA(AdapterBase):
    """LoRA through PEFT: dW = (alpha / r) B A (arXiv:2106.09685)."""

    options: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)

    kind: ClassVar[str] = "lora"
    algebra: ClassVar[Algebra] = Algebra.LORA_PRODUCT

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        return inject_(model, lora_config(self.options, ctx.model_type, r=ctx.r_max), ctx.seed)

    def parameters(self, model: Any) -> dict[str, torch.nn.Parameter]:
        """Adapter parameters keyed like the adapter state (the adapter name 'default' removed)."""
        return {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}

    def state(self, model: Any) -> AdapterState:
        from peft import get_peft_model_state_dict

        return detached(get_peft_model_state_dict(model))

    def load_(self, model: Any, state: AdapterState) -> None:
        """Load factors padded to the model's rank (a rank-r_k client inside the max-rank LoRA)."""
        from peft import set_peft_model_state_dict

        params = self.parameters(model)
        set_peft_model_state_dict(model, {k: pad_to(v, params[k].shape) for k, v in state.items()})

    def scale(self, model: Any) -> float:
        for m in model.modules():
            scaling = getattr(m, "scaling", None)
            if isinstance(scaling, dict) and "default" in scaling:
                return float(scaling["default"])
        raise ValueError("model has no LoRA adapter")

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        return export_peft(state, peft_config, base_model, out_dir)

"""S'MoRE: structural mixture of residual experts (Zeng et al., arXiv:2504.06426, NeurIPS 2025).

Around each target linear layer (y = W0 x), expert weights are a hierarchical low-rank
decomposition: level l = 1..L (the residual of order l) holds s residual experts, each a
low-rank pair A_{l,j} [r, in], B_{l,j} [h, r]. A token is routed top-down through a sub-tree of
residuals, and their embeddings propagate bottom-up as a message-passing (GNN-like) layer:

    u        = D x                                         (router down-projection, [g])
    routing  : the root picks `fanout` experts at level L with weights
               w = top-k softmax(G_L u); a chosen node (l, j) picks its children at level l-1
               with top-k softmax(G_{l-1} [u ; key of each ancestor]) (keys: K_l [s, g])
    leaves   : e_{1,j}    = sigma(B_{1,j} A_{1,j} x)
    level l  : e_{l,j}(t) = sigma(B_{l,j} A_{l,j} x + W_l sum_{c in children_t(j)} w_c e_{l-1,c}(t))
    root     : h = sum_{j chosen at level L} w_j e_{L,j}
    y        = W0 x + W_out h                              (W_out [out, h] starts at zero)

(t: the node's place in the token's tree; the same expert under two parents is two nodes.) With
fanout f, a token mixes f^L paths, each a different composite expert: s * L low-rank pairs
emulate up to s^L experts (the paper's "structural flexibility"). Children are computed densely
(every node of the full s-ary tree; unchosen ones get weight 0), so the cost per token grows as
s^L: keep experts and levels small.

Simplifications against the paper (stated, not retrieved as formulas; its method section was not
reachable here, only its abstract and a summary of the official code): one hidden width h for
every level (the code widens level by level), no biases, a router per target linear layer, the
ancestors' keys concatenated to the down-projected token, no load-balancing loss (the paper's
Switch gate adds one; `aux_loss` is None here).

Federated like the mixture adapter: state keys are expert-indexed (`moe_lora.expert_index`), so
CoMiGS's presets pick what is shared: generalists j < G at every level, plus the tree's structure
(W_l, W_out, stored as expert 0 of their own lists) whenever G >= 1, unless
`adapter.share_structure: false` (then W_l and W_out are plain tensors, with no expert index, and
stay on the client); routers (D, G_l, K_l) and specialists stay on the client. FedAvg-family
strategies average everything; the exact LoRA strategies refuse it (algebra MIXTURE). Exported
as `smore_adapter.safetensors` + `smore_config.json` (PEFT has no S'MoRE): load with
`load_smore_adapter`.

Trainable parameters per wrapped layer (no biases):
    L s r (in + h) + (L - 1) h^2 + out h + g in + s g sum_{l=1..L} (1 + L - l) + (L - 1) s g
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.adapters.base import ADAPTERS, KIND_MARK, AdapterBase, Algebra, InjectContext, ParamGroup
from fedtune.adapters.lora import lora_config
from fedtune.adapters.lora_sb import target_names, weight_of
from fedtune.adapters.smore_layers import SMoRELinear
from fedtune.config.adapters import SMoREAdapterConfig
from fedtune.types import AdapterState

ROUTER = ".smore_router_"
INFO = "_fedtune_smore"


def is_router_key(key: str) -> bool:
    return ROUTER in key


def smore_param_count(d_in: int, d_out: int, o: SMoREAdapterConfig) -> int:
    """Trainable parameters of one wrapped [d_out, d_in] layer (module docstring)."""
    h, s, lv, g = o.hidden or o.r, o.experts, o.levels, o.gate_dim
    gates = s * g * sum(1 + lv - level for level in range(1, lv + 1))
    return lv * s * o.r * (d_in + h) + (lv - 1) * h * h + d_out * h + g * d_in + gates + (lv - 1) * s * g


def _targets(model: nn.Module, names: list[str]) -> list[str]:
    out = [
        prefix
        for prefix, mod in model.named_modules()
        if prefix.rsplit(".", 1)[-1] in names and isinstance(getattr(mod, "weight", None), torch.Tensor)
    ]
    if not out:
        raise ValueError(f"no module named {names} found for the S'MoRE adapter")
    return out


def inject_smore_(model: nn.Module, targets: list[str], info: dict[str, Any], seed: int = 0) -> nn.Module:
    """Wrap the target layers in place (seeded init, drawn on the host; base weights frozen)."""
    model.requires_grad_(False)
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        mods = dict(model.named_modules())
        for p in _targets(model, targets):
            parent_name, _, leaf = p.rpartition(".")
            parent = mods[parent_name] if parent_name else model
            opts = {k: info[k] for k in ("r", "levels", "experts", "fanout", "hidden", "gate_dim", "activation")}
            shared = bool(info.get("share_structure", True))  # adapters exported before the option share it
            layer = SMoRELinear(mods[p], dropout=info["dropout"], share_structure=shared, **opts)
            setattr(parent, leaf, layer.to(weight_of(mods[p]).device))
    finally:
        torch.random.set_rng_state(saved)
    model.__dict__[KIND_MARK] = "smore"
    model.__dict__[INFO] = {**info, "targets": targets}
    return model


def smore_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".smore_" in n}


def load_smore_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load an exported S'MoRE adapter onto a fresh base model:

    model = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = load_smore_adapter(model, "runs/x/adapters/global")
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    info = json.loads((d / "smore_config.json").read_text())
    inject_smore_(model, info.pop("targets"), info)
    params = smore_parameters(model)
    with torch.no_grad():
        for k, v in load_file(str(d / "smore_adapter.safetensors")).items():
            params[k].copy_(v)
    model.eval()
    return model


@ADAPTERS.register("smore", "S'MoRE: a routed tree of low-rank residual experts (arXiv:2504.06426).")
@dataclass(frozen=True)
class SMoRE(AdapterBase):
    """Structural mixture of residual experts (arXiv:2504.06426): module docstring."""

    options: SMoREAdapterConfig = field(default_factory=SMoREAdapterConfig)

    kind: ClassVar[str] = "smore"
    algebra: ClassVar[Algebra] = Algebra.MIXTURE

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        o = self.options
        info = {
            "r": o.r,
            "levels": o.levels,
            "experts": o.experts,
            "fanout": o.fanout,
            "hidden": o.hidden or o.r,
            "gate_dim": o.gate_dim,
            "activation": o.activation,
            "dropout": o.dropout,
            "share_structure": o.share_structure,
        }
        targets = target_names(model, lora_config(o, ctx.model_type).target_modules)
        return inject_smore_(model, targets, info, ctx.seed)

    def parameters(self, model: Any) -> dict[str, nn.Parameter]:
        return smore_parameters(model)

    def scale(self, model: Any) -> float:
        return 1.0

    def param_groups(self, keys: Any) -> list[ParamGroup]:
        """Residuals and structure on the client's steps; the routers on their own schedule
        (adapter.router_every > 0: CoMiGS's alternation on the validation split)."""
        o = self.options
        routers = tuple(sorted(k for k in keys if is_router_key(k)))
        rest = tuple(sorted(k for k in keys if not is_router_key(k)))
        return [ParamGroup("experts", rest), ParamGroup("router", routers, o.router_lr, o.router_every, o.router_steps)]

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        """smore_adapter.safetensors + smore_config.json (see `load_smore_adapter`)."""
        from fedtune.files import write_atomic, write_safetensors

        out_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(out_dir / "smore_adapter.safetensors", {k: v.contiguous() for k, v in state.items()})
        info = {**model.__dict__[INFO], "base_model_name_or_path": base_model}
        write_atomic(out_dir / "smore_config.json", json.dumps(info, indent=2, sort_keys=True))
        return out_dir

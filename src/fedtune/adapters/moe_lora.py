"""Mixture of LoRA experts (CoMiGS, arXiv:2409.13931; router variants from arXiv:2402.13089).

Each wrapped block (every MLP; optionally every attention block too) becomes E experts. Expert i
is the frozen pretrained block with its own LoRA (rank r, scale alpha/r) on each of its linear
layers; a router (one bias-free linear per block, on the block's input) mixes them:

    g = W_router x                       (per token; 'sequence': the causal prefix mean of g)
    S = top-k(g)                         (k >= active experts: every expert, a dense mixture)
    w_i = softmax_{j in S}(g_j)_i        for i in S, 0 otherwise
    y = sum_i w_i * Expert_i(x)

Load balancing (Switch Transformer, arXiv:2101.03961), per block over the N tokens of a batch:

    f_i = (1/N) sum_t 1[i in S_t] / k,   P_i = (1/N) sum_t softmax(g_t)_i,   LB = E * sum_i f_i P_i

LB = 1 for uniform routing and LB >= 1 whenever all tokens share one routing distribution (the
top-k mass of a distribution is at least k/E); the loss adds lb_weight * mean over blocks.

Router kinds: 'token' (learned, per token), 'sequence' (learned, one decision per causal prefix:
the mean of g over tokens 1..t, so no token sees the future), 'frozen' (random, never trained;
the design-choices study found it about as good as a learned router).

Clients may have different numbers of experts: the model holds the largest count and a client's
expert count masks the router (inactive experts get no weight and are never run).

State keys (per expert, so strategies can share some experts and keep others):
    <block>.<linear>.moe_lora_A.<i>  [r, in]      <block>.<linear>.moe_lora_B.<i>  [out, r]
    <block>.moe_router.weight        [E, hidden]  (frozen router: <block>.moe_frozen_router.weight)
Experts run densely (each active expert is a full pass through its block), so E experts cost
about E times the wrapped blocks' compute. Attention experts are for training and scoring; text
generation with a KV cache should use MLP experts only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.adapters.base import (
    ADAPTERS,
    KIND_MARK,
    AdapterBase,
    Algebra,
    EngineNeed,
    InjectContext,
    ParamGroup,
)
from fedtune.adapters.lora_sb import weight_of
from fedtune.adapters.moe_layers import ExpertLoRA, MoEBlock
from fedtune.config.adapters import MoELoraAdapterConfig
from fedtune.errors import Problem
from fedtune.types import AdapterState

# expert-indexed keys: this mixture's factors, and S'MoRE's residuals and structure (`adapters.smore`)
EXPERT_KEY = re.compile(r"\.(?:moe_lora_[AB]|smore_[ABW]_l\d+|smore_W_out)\.(\d+)$")
ROUTER = ".moe_router.weight"
FROZEN_ROUTER = ".moe_frozen_router.weight"
MLP_NAMES = ("mlp",)
ATTENTION_NAMES = ("self_attn", "attn", "attention")


def expert_index(key: str) -> int | None:
    """The expert a state key belongs to (None for routers)."""
    m = EXPERT_KEY.search(key)
    return int(m.group(1)) if m else None


def is_router_key(key: str) -> bool:
    return key.endswith(ROUTER) or key.endswith(FROZEN_ROUTER)


def _block_hidden(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, (nn.Linear,)) or type(m).__name__ == "Conv1D":
            w = weight_of(m)
            return int(w.shape[0] if type(m).__name__ == "Conv1D" else w.shape[1])
    raise ValueError(f"{type(block).__name__} has no linear layer to put experts on")


def find_blocks(model: nn.Module, modules: str) -> list[str]:
    """Names of the blocks to wrap: every '*.mlp' (and attention blocks for 'mlp+attention')."""
    names = MLP_NAMES + (ATTENTION_NAMES if modules == "mlp+attention" else ())
    out = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    if not any(n.rsplit(".", 1)[-1] in MLP_NAMES for n in out):
        raise ValueError(
            f"{type(model).__name__} has no '*.mlp' blocks; the MoE-LoRA adapter needs the usual MLP names"
        )
    return out


def inject_moe_lora_(
    model: nn.Module,
    *,
    num_experts: int,
    r: int,
    alpha: float,
    top_k: int = 2,
    router: str = "token",
    dropout: float = 0.0,
    modules: str = "mlp",
    seed: int = 0,
) -> nn.Module:
    """Wrap the model's blocks in place (seeded init; base weights frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in find_blocks(model, modules):
            parent_name, leaf = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            block = getattr(parent, leaf)
            hidden = _block_hidden(block)
            device = next(iter(block.parameters())).device  # experts and router join the block there
            for sub_name, sub in list(block.named_modules()):
                if sub_name and (isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D"):
                    owner_name, sub_leaf = sub_name.rsplit(".", 1) if "." in sub_name else ("", sub_name)
                    owner = block.get_submodule(owner_name) if owner_name else block
                    setattr(owner, sub_leaf, ExpertLoRA(sub, num_experts, r, alpha / r, dropout))
            # experts and router are drawn on the host (the same values on any device), then moved
            setattr(parent, leaf, MoEBlock(block, hidden, num_experts, top_k, router).to(device))
    finally:
        torch.random.set_rng_state(saved)
    model.__dict__[KIND_MARK] = "moe_lora"
    model.__dict__["_fedtune_moe"] = {
        "num_experts": num_experts,
        "r": r,
        "alpha": alpha,
        "top_k": top_k,
        "router": router,
        "dropout": dropout,
        "modules": modules,
    }
    return model


def moe_info(model: Any) -> dict[str, Any]:
    """The mixture's settings recorded at injection (for export)."""
    return dict(model.__dict__["_fedtune_moe"])


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def moe_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter tensors keyed like the state (the '.inner' wrapper level is part of the key)."""
    return {n: p for n, p in model.named_parameters() if ".moe_" in n}


def set_expert_count_(model: nn.Module, n: int | None) -> None:
    """A client with n experts uses experts 0..n-1 (None: all)."""
    for b in moe_blocks(model):
        b.expert_mask.fill_(False)
        b.expert_mask[: b.num_experts if n is None else n] = True


def load_balancing_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean LB over blocks from the last forward pass (None if no forward has run)."""
    losses = [b.lb_loss for b in moe_blocks(model) if b.lb_loss is not None]
    return torch.stack(losses).mean() if losses else None


def router_keys(keys: Any) -> list[str]:
    return [k for k in keys if k.endswith(ROUTER)]


def save_moe_adapter(state: dict[str, torch.Tensor], info: dict[str, Any], out_dir: Path) -> Path:
    """`moe_adapter.safetensors` + `moe_config.json` (see load_moe_adapter)."""
    from fedtune.files import write_atomic, write_safetensors

    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "moe_adapter.safetensors", {k: v.contiguous() for k, v in state.items()})
    write_atomic(out_dir / "moe_config.json", json.dumps(info, indent=2, sort_keys=True))
    return out_dir


def load_moe_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load an exported MoE-LoRA adapter onto a fresh base model:

    model = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = load_moe_adapter(model, "runs/x/adapters/client-a")
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    info = json.loads((d / "moe_config.json").read_text())
    inject_moe_lora_(
        model,
        num_experts=info["num_experts"],
        r=info["r"],
        alpha=info["alpha"],
        top_k=info["top_k"],
        router=info["router"],
        modules=info["modules"],
    )
    params = moe_parameters(model)
    with torch.no_grad():
        for k, v in load_file(str(d / "moe_adapter.safetensors")).items():
            params[k].copy_(v)
    set_expert_count_(model, info.get("client_experts"))
    model.eval()
    return model


@ADAPTERS.register("moe_lora", "Mixture of LoRA experts with a router (CoMiGS).")
@dataclass(frozen=True)
class MoELoRA(AdapterBase):
    """Mixture of LoRA experts with a router (CoMiGS, arXiv:2409.13931): module docstring."""

    options: MoELoraAdapterConfig = field(default_factory=MoELoraAdapterConfig)

    kind: ClassVar[str] = "moe_lora"
    algebra: ClassVar[Algebra] = Algebra.MIXTURE
    frozen_suffixes: ClassVar[tuple[str, ...]] = (FROZEN_ROUTER,)

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        o = self.options
        return inject_moe_lora_(
            model,
            num_experts=o.max_experts(),
            r=o.r,
            alpha=o.alpha,
            top_k=o.top_k,
            router=o.router,
            dropout=o.dropout,
            modules=o.moe_modules,
            seed=ctx.seed,
        )

    def parameters(self, model: Any) -> dict[str, nn.Parameter]:
        return moe_parameters(model)

    def scale(self, model: Any) -> float:
        info = moe_info(model)
        return float(info["alpha"] / info["r"])

    def use_client_(self, model: Any, variant: int | None) -> None:
        """A client with n experts uses experts 0..n-1 (None: all)."""
        set_expert_count_(model, variant)

    def client_variants(self, client_ids: Sequence[str]) -> dict[str, int]:
        counts = self.options.experts
        return dict(zip(client_ids, counts)) if isinstance(counts, list) else {}

    def param_groups(self, keys: Sequence[str]) -> list[ParamGroup]:
        """Experts train on the client's steps; a learned router on CoMiGS's alternating schedule."""
        o = self.options
        routers = tuple(sorted(k for k in keys if is_router_key(k)))
        experts = tuple(sorted(k for k in keys if not is_router_key(k)))
        every = o.router_every if o.router != "frozen" else 0
        return [
            ParamGroup("experts", experts),
            ParamGroup("router", routers, lr=o.router_lr, every=every, steps=o.router_steps),
        ]

    def aux_loss(self, model: Any) -> torch.Tensor | None:
        """lb_weight * the Switch load-balancing loss of the last forward pass."""
        if self.options.lb_weight <= 0:
            return None
        lb = load_balancing_loss(model)
        return None if lb is None else self.options.lb_weight * lb

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        """moe_adapter.safetensors + moe_config.json (PEFT has no mixture): `load_moe_adapter`."""
        info = {**moe_info(model), "base_model_name_or_path": base_model, "client_experts": variant}
        return save_moe_adapter(state, info, out_dir)

    def client_problems(self, client_ids: Sequence[str]) -> list[Problem]:
        counts, n = self.options.experts, len(client_ids)
        if not isinstance(counts, list) or len(counts) == n:
            return []
        return [
            Problem(
                "adapter.experts",
                counts,
                f"one expert count per client is needed; there are {n} clients ({', '.join(client_ids)})",
                f"give {n} counts, or one number for all",
            )
        ]

    def engine_needs(self) -> list[EngineNeed]:
        counts = self.options.experts
        if not isinstance(counts, list):
            return []
        why = "per-client expert counts are not carried to the clients"
        return [EngineNeed("per_client_experts", "adapter.experts", counts, why, "give one count, or {inprocess}")]

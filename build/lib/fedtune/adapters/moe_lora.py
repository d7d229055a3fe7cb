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
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.adapters import adapter_input
from fedtune.adapters.lora_sb import weight_of

EXPERT_KEY = re.compile(r"\.moe_lora_[AB]\.(\d+)$")
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


class ExpertLoRA(nn.Module):
    """A frozen nn.Linear / GPT-2 Conv1D plus one LoRA per expert; `active` picks the expert."""

    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, scale: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        w = weight_of(base_layer)
        conv1d = type(base_layer).__name__ == "Conv1D"  # stores [in, out]
        d_out, d_in = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.moe_lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, d_in)) for _ in range(num_experts)])
        self.moe_lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, r)) for _ in range(num_experts)])
        for a in self.moe_lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's LoRA: B = 0, so the start is the base
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active is None:
            return torch.as_tensor(out)
        a, b = self.moe_lora_A[self.active], self.moe_lora_B[self.active]
        h = adapter_input(self.dropout(x), a.dtype) @ a.T
        out = torch.as_tensor(out)
        return out + torch.as_tensor(self.scale * (h @ b.T)).to(out.dtype)


class MoEBlock(nn.Module):
    """Routes each token over E expert copies of `inner` (whose linears are ExpertLoRA)."""

    def __init__(self, inner: nn.Module, hidden: int, num_experts: int, top_k: int, router: str):
        super().__init__()
        self.inner = inner
        self.num_experts, self.top_k, self.router_kind = num_experts, top_k, router
        gate = nn.Linear(hidden, num_experts, bias=False)
        nn.init.normal_(gate.weight, std=0.02)
        if router == "frozen":
            gate.weight.requires_grad_(False)
            self.moe_frozen_router = gate
        else:
            self.moe_router = gate
        self.expert_mask: torch.Tensor
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.lb_loss: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None

    @property
    def gate(self) -> nn.Linear:
        return self.moe_frozen_router if self.router_kind == "frozen" else self.moe_router

    def experts(self) -> list[ExpertLoRA]:
        return [m for m in self.inner.modules() if isinstance(m, ExpertLoRA)]

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixture weights w [.., E], load-balancing loss) for block input x [B, T, H]."""
        g = self.gate(adapter_input(x, self.gate.weight.dtype)).float()
        if self.router_kind == "sequence":  # causal prefix mean: one decision per prefix, no look-ahead
            steps = torch.arange(1, g.shape[-2] + 1, device=g.device, dtype=g.dtype)[:, None]
            g = g.cumsum(dim=-2) / steps
        g = g.masked_fill(~self.expert_mask, float("-inf"))
        active = int(self.expert_mask.sum())
        k = min(self.top_k, active)
        top = g.topk(k, dim=-1)
        w = torch.zeros_like(g).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        probs = torch.softmax(g, dim=-1).reshape(-1, g.shape[-1])
        chosen = torch.zeros_like(g).scatter(-1, top.indices, 1.0 / k).reshape(-1, g.shape[-1])
        lb = active * (chosen.mean(0) * probs.mean(0)).sum()
        self.last_probs = probs.detach()
        return w, lb

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        w, self.lb_loss = self.routing(hidden_states)
        used = [i for i in range(self.num_experts) if bool(self.expert_mask[i]) and bool((w[..., i] > 0).any())]
        layers = self.experts()
        mixed, rest = None, ()
        for i in used:
            for m in layers:
                m.active = i
            out = self.inner(hidden_states, *args, **kwargs)
            y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            term = w[..., i : i + 1].to(y.dtype) * y
            mixed = term if mixed is None else mixed + term
        for m in layers:
            m.active = None
        return (mixed, *rest) if rest else mixed


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
    model.__dict__["_fedtune_adapter"] = "moe_lora"
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


def is_moe(model: Any) -> bool:
    return getattr(model, "__dict__", {}).get("_fedtune_adapter") == "moe_lora"


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

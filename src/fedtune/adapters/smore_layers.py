"""The layer of S'MoRE (the maths: `adapters.smore`'s docstring): a frozen linear plus a routed
tree of low-rank residual experts."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedtune.adapters.base import adapter_input
from fedtune.adapters.lora_sb import weight_of


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": _identity,
}


def top_k_softmax(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the k largest logits of the last dim, 0 elsewhere (k >= width: dense)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))


def _params(n: int, *shape: int, zero: bool = False) -> nn.ParameterList:
    out = nn.ParameterList([nn.Parameter(torch.zeros(*shape)) for _ in range(n)])
    if not zero:
        for p in out:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return out


class SMoRELinear(nn.Module):
    """base(x) + W_out h_root(x) around a frozen nn.Linear or GPT-2 Conv1D (levels 1..L).

    Tensors (key suffixes; j = expert): smore_A_l<l>.<j> [r, in], smore_B_l<l>.<j> [h, r],
    smore_W_l<l>.0 [h, h] (l >= 2), smore_W_out.0 [out, h] (zero: the start is the base),
    smore_router_down [g, in], smore_router_gate_l<l> [s, g (1 + L - l)], smore_router_key_l<l>
    [s, g] (l >= 2). The structure (W_l, W_out) is stored as 'expert 0' of its own lists, so
    CoMiGS's presets share it exactly when they share a generalist; with share_structure=False it
    is a plain tensor (smore_W_l<l>, smore_W_out: no expert index), which CoMiGS keeps on the
    client (the same values: the same seeded init)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        levels: int,
        experts: int,
        fanout: int,
        hidden: int,
        gate_dim: int,
        activation: str,
        dropout: float = 0.0,
        share_structure: bool = True,
    ):
        super().__init__()
        self.base_layer = base_layer
        w = weight_of(base_layer)
        conv1d = type(base_layer).__name__ == "Conv1D"  # stores [in, out]
        d_out, d_in = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
        self.levels, self.experts, self.fanout, self.activation = levels, experts, fanout, activation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for level in range(1, levels + 1):
            setattr(self, f"smore_A_l{level}", _params(experts, r, d_in))
            setattr(self, f"smore_B_l{level}", _params(experts, hidden, r))
            gate = nn.Parameter(torch.empty(experts, gate_dim * (1 + levels - level)))
            nn.init.normal_(gate, std=0.02)
            setattr(self, f"smore_router_gate_l{level}", gate)
            if level >= 2:
                wl = _params(1, hidden, hidden)
                setattr(self, f"smore_W_l{level}", wl if share_structure else wl[0])
                key = nn.Parameter(torch.empty(experts, gate_dim))
                nn.init.normal_(key, std=1.0)
                setattr(self, f"smore_router_key_l{level}", key)
        w_out = _params(1, d_out, hidden, zero=True)
        self.smore_W_out = w_out if share_structure else w_out[0]
        self.smore_router_down = nn.Parameter(torch.empty(gate_dim, d_in))
        nn.init.normal_(self.smore_router_down, std=1.0 / math.sqrt(d_in))

    def _level(self, name: str, level: int) -> torch.Tensor:
        """The s tensors of `name` at `level`, stacked [s, ...]."""
        plist = getattr(self, f"smore_{name}_l{level}")
        return torch.stack(list(plist))

    def routing(self, u: torch.Tensor) -> dict[int, torch.Tensor]:
        """Top-down: the weights [N, s^(L-l), s] each node of level l+1 (root: one) gives its
        children at level l, from the token u [N, g] and the keys of the node's ancestors."""
        n, s = u.shape[0], self.experts
        anc = u[:, None, :]  # [N, P, g (1 + L - l)]: one root path
        weights = {}
        for level in range(self.levels, 0, -1):
            gate = getattr(self, f"smore_router_gate_l{level}")
            weights[level] = top_k_softmax(anc @ gate.T, self.fanout)  # [N, P, s]
            if level > 1:
                key = getattr(self, f"smore_router_key_l{level}")  # the chosen child becomes an ancestor
                p, width = anc.shape[1], anc.shape[2]
                anc = torch.cat(
                    [anc[:, :, None, :].expand(n, p, s, width), key[None, None].expand(n, p, s, key.shape[1])], -1
                ).reshape(n, p * s, width + key.shape[1])
        return weights

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """W_out h_root(x) for x [N, in] (bottom-up propagation over the routed tree)."""
        sigma = ACTIVATIONS[self.activation]
        u = x @ self.smore_router_down.T  # [N, g]
        weights = self.routing(u)
        agg: torch.Tensor | None = None  # [N, P, h]: each level-l node's weighted children
        for level in range(1, self.levels + 1):
            a, b = self._level("A", level), self._level("B", level)  # [s, r, in], [s, h, r]
            own = torch.einsum("nsr,shr->nsh", torch.einsum("ni,sri->nsr", x, a), b)  # B_j A_j x: [N, s, h]
            w = weights[level]  # [N, P_l, s]
            pre = own[:, None].expand(-1, w.shape[1], -1, -1)  # [N, P_l, s, h]
            if agg is not None:
                wl = self._structure(f"smore_W_l{level}")
                pre = pre + (agg @ wl.T).reshape(pre.shape)  # the child subtree of each node
            agg = (w[..., None] * sigma(pre)).sum(-2)  # [N, P_l, h]
        assert agg is not None
        return torch.as_tensor(agg[:, 0] @ self._structure("smore_W_out").T)

    def _structure(self, name: str) -> torch.Tensor:
        """W_l or W_out: expert 0 of its list (shared with the generalists), or a plain tensor."""
        p = getattr(self, name)
        return torch.as_tensor(p[0] if isinstance(p, nn.ParameterList) else p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(self.base_layer(x))
        xa = adapter_input(self.dropout(x), self.smore_router_down.dtype)
        d = self.delta(xa.reshape(-1, xa.shape[-1]))
        return out + d.reshape(*out.shape[:-1], d.shape[-1]).to(out.dtype)

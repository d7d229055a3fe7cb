"""Heterogeneous client ranks: FlexLoRA (SVD redistribution) and HetLoRA (zero-padding, norm
weighting, rank self-pruning). Clients of rank r_k receive and return rank-r_k factors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch

from fedtune.models.adapters import pad_to
from fedtune.strategies.base import EXACT_LORA, STRATEGIES, Capabilities, Combined, GlobalModel, example_weights
from fedtune.strategies.lora_math import A_SUFFIX, B_SUFFIX, lora_modules
from fedtune.strategies.merge import client_states, truncate_rank, weighted_products
from fedtune.strategies.params import NonNegative, Probability
from fedtune.types import AdapterState, ClientUpdate


def svd_factors(dw: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of dw = s * B @ A (Eckart-Young): A = V^T[:r], B = U[:, :r] S[:r] / s.
    Also returns the relative truncation error ||dw - s B A||_F / ||dw||_F."""
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    r = min(rank, s.numel())
    a = pad_to(vh[:r].float(), torch.Size([rank, dw.shape[1]]))
    b = pad_to((u[:, :r] * s[:r] / scale).float(), torch.Size([dw.shape[0], rank]))
    total = float(s.pow(2).sum())
    err = (float(s[r:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return a, b, err


@STRATEGIES.register("flexlora")
@dataclass(frozen=True)
class FlexLoRA(GlobalModel):
    """FlexLoRA (arXiv:2402.11505): aggregate full dW = s sum_k p_k B_k A_k, redistribute by SVD
    truncated to each client's rank (best rank-r_k approximation). Exact up to the max rank."""

    capabilities = Capabilities(heterogeneous_ranks=True, algebras=EXACT_LORA)

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return truncate_rank(state["global"], self.ctx.client_ranks.get(client_id))

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        glob = state["global"]
        sent = self.configure(rnd, [u.client_id for u in updates], state)
        dense = weighted_products(client_states(sent, updates), example_weights(updates), self.ctx.lora_scale)
        new, errs = dict(glob), []
        for m, dw in dense.items():
            rank = glob[m + A_SUFFIX].shape[0]
            new[m + A_SUFFIX], new[m + B_SUFFIX], err = svd_factors(dw, rank, self.ctx.lora_scale)
            errs.append(err)
        return new, {}, {"agg_error": max(errs)}


def hetlora_tail(a: torch.Tensor, b: torch.Tensor, r: int, gamma: float) -> torch.Tensor:
    """||A[floor(gamma r):r]|| * ||B[:, floor(gamma r):r]||: HetLoRA's rank self-pruning signal."""
    cut = int(gamma * r)
    return torch.as_tensor(a[cut:r].norm() * b[:, cut:r].norm())


@STRATEGIES.register("hetlora")
@dataclass(frozen=True)
class HetLoRA(GlobalModel):
    """HetLoRA (arXiv:2401.06432): zero-pad client factors to the max rank, average each tensor with
    weights ||T_k||_F / sum_j ||T_j||_F, send client k the first r_k ranks. Rank self-pruning: a
    client's loss adds lambda * sum ||A[gamma r:]|| ||B[:, gamma r:]||, and its rank drops to
    floor(gamma r) when its tail product is below the global model's. Inexact (like FedIT)."""

    prune_lambda: NonNegative = 0.01
    prune_gamma: Probability = 0.99
    capabilities = Capabilities(heterogeneous_ranks=True, client_penalty=True, algebras=EXACT_LORA)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state, "ranks": dict(self.ctx.client_ranks)}

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return truncate_rank(state["global"], state["ranks"].get(client_id))

    def client_penalty(
        self, params: Mapping[str, torch.nn.Parameter], received: AdapterState
    ) -> Callable[[], torch.Tensor] | None:
        """The self-pruning regulariser on the client's own rank r_k (= the rank it received)."""
        if self.prune_lambda <= 0:
            return None
        mods = [
            (params[m + A_SUFFIX], params[m + B_SUFFIX], received[m + A_SUFFIX].shape[0])
            for m in lora_modules(received)
        ]

        def penalty() -> torch.Tensor:
            return self.prune_lambda * sum(hetlora_tail(a, b, r, self.prune_gamma) for a, b, r in mods)  # type: ignore[return-value]

        return penalty

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        glob = state["global"]
        sent = self.configure(rnd, [u.client_id for u in updates], state)
        clients = client_states(sent, updates)
        new = dict(glob)
        for key in clients[0]:
            padded = [pad_to(c[key], glob[key].shape) for c in clients]
            norms = torch.stack([p.norm() for p in padded])
            w = norms / norms.sum() if float(norms.sum()) > 0 else torch.full_like(norms, 1 / len(padded))
            new[key] = reduce(torch.add, [wi * p for wi, p in zip(w, padded)])
        ranks = dict(state["ranks"])
        for u, c in zip(updates, clients):
            r = ranks.get(u.client_id, glob[lora_modules(glob)[0] + A_SUFFIX].shape[0])
            own = sum(
                float(hetlora_tail(c[m + A_SUFFIX], c[m + B_SUFFIX], r, self.prune_gamma)) for m in lora_modules(c)
            )
            ref = sum(
                float(hetlora_tail(new[m + A_SUFFIX], new[m + B_SUFFIX], r, self.prune_gamma))
                for m in lora_modules(new)
            )
            if own < ref and int(self.prune_gamma * r) >= 1:
                ranks[u.client_id] = int(self.prune_gamma * r)
        return new, {"ranks": ranks}, {"mean_rank": sum(ranks.values()) / max(1, len(ranks))}

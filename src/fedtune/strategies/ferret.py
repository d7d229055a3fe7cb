"""Ferret (Shu et al., arXiv:2409.06277): first-order local steps, then the update is projected onto
random bases that every party regenerates from shared seeds, so a client uploads only the
projection coordinates.

- The trained tensors (sorted keys) are grouped into blocks of consecutive tensors of up to 0.9 x
  the median tensor size (a tensor larger than that is a block of its own).
- Client: from the global model w, `train.steps` steps of plain SGD (no momentum) give w_end and
  the update D = w - w_end. Block g of size d_g gets K_g = max(2, floor(K ||D_g|| / max_h ||D_h||))
  bases v_{g,i} (truncated normal, std 1, cut at +-2, scaled by 1/sqrt(d_g); seeded by
  (run seed, round, block, i)) and coordinates gamma_{g,i} = (d_g / K_g) <D_g, v_{g,i}>. Upload:
  the coordinates and the K_g (4 bytes each), instead of the d-dimensional D.
- Server: gamma_bar = sum_k p_k gamma_k (per block, zero-padded to the largest K_g), then for
  each block the reconstruction u_g = sum_i gamma_bar_{g,i} v_{g,i}, clipped to norm `clip`,
  and w <- w - server_lr * u. Downlink: the coordinates of every round a client missed; each
  client applies the same reconstruction to its copy of w (bit-identical: one function).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.adapters import adapter_of
from fedtune.adapters.base import Adapter
from fedtune.client.train import TrainData, TrainSpec, local_train_
from fedtune.data.blocks import Shard
from fedtune.models.adapters import get_state, select_trainable_, set_state_, trainable_keys
from fedtune.seeding import derive_seed, torch_generator
from fedtune.strategies.base import (
    STRATEGIES,
    Aggregate,
    Capabilities,
    PeerScoring,
    StrategyBase,
    example_weights,
    sorted_updates,
)
from fedtune.strategies.params import Count, Positive
from fedtune.types import AdapterState, ClientUpdate

COORDS, COUNTS = "ferret.gamma", "ferret.k"


def blocks_of(shapes: Mapping[str, torch.Size]) -> list[list[str]]:
    """Consecutive tensors (sorted keys) grouped up to 0.9 x the median tensor size."""
    keys = sorted(shapes)
    sizes = [math.prod(shapes[k]) for k in keys]
    limit = 0.9 * sorted(sizes)[len(sizes) // 2]
    out: list[list[str]] = []
    cur: list[str] = []
    total = 0
    for k, n in zip(keys, sizes):
        if cur and total + n > limit:
            out.append(cur)
            cur, total = [], 0
        cur.append(k)
        total += n
    if cur:
        out.append(cur)
    return out


def basis(seed: int, rnd: int, block: int, i: int, d: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, "ferret-basis", rnd, block, i))
    v = torch.empty(d)
    torch.nn.init.trunc_normal_(v, std=1.0, a=-2.0, b=2.0, generator=gen)
    return v / math.sqrt(d)


def flat_block(state: AdapterState, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in keys])


def project(
    delta: AdapterState, groups: list[list[str]], k: int, seed: int, rnd: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coordinates [G, K_max] zero-padded, K_g [G]) of an update."""
    norms = [float(flat_block(delta, g).norm()) for g in groups]
    top = max(norms) or 1.0
    counts = [max(2, int(k * n / top)) for n in norms]
    coords = torch.zeros(len(groups), max(counts), dtype=torch.float64)
    for b, g in enumerate(groups):
        x = flat_block(delta, g)
        d = x.numel()
        for i in range(counts[b]):
            coords[b, i] = (d / counts[b]) * float(x @ basis(seed, rnd, b, i, d).double())
    return coords.float(), torch.tensor(counts, dtype=torch.int32)


def apply_round(
    w: AdapterState, coords: torch.Tensor, groups: list[list[str]], seed: int, rnd: int, lr: float, clip: float
) -> AdapterState:
    """w - lr * clip(sum_i coords[g, i] v_{g,i}) per block (the reconstruction, on every party)."""
    out = dict(w)
    for b, g in enumerate(groups):
        d = sum(w[k].numel() for k in g)
        u = torch.zeros(d, dtype=torch.float64)
        for i in torch.nonzero(coords[b]).flatten().tolist():
            u += float(coords[b, i]) * basis(seed, rnd, b, i, d).double()
        norm = float(u.norm())
        if norm > clip:
            u *= clip / norm
        start = 0
        for k in g:
            n = w[k].numel()
            out[k] = (w[k].double() - lr * u[start : start + n].reshape(w[k].shape)).float()
            start += n
    return out


@STRATEGIES.register("ferret")
@dataclass(frozen=True)
class Ferret(StrategyBase):
    """Ferret: SGD locally, upload the update's coordinates on shared random bases (module docstring)."""

    bases: Count = 200  # K
    server_lr: Positive = 1.0
    clip: Positive = 10.0

    # each client keeps its copy of the global model and trains with its own step
    capabilities = Capabilities(client_private=True, client_step=True)

    def private_keys(self, state: AdapterState) -> set[str]:
        return set(state)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": global_state, "history": {}, "synced": {}}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        out = {}
        for cid in client_ids:  # every round's aggregate the client has not applied yet
            missed = [r for r in sorted(state["history"]) if r > state["synced"].get(cid, 0)]
            out[cid] = {f"{COORDS}.{r}": state["history"][r] for r in missed} or {"ferret.none": torch.zeros(0)}
        return out

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        if not updates:
            return Aggregate(state["global"], state)
        ups = sorted_updates(updates)
        groups = blocks_of({k: v.shape for k, v in state["global"].items() if k in trainable_keys(state["global"])})
        width = max(int(u.delta[COUNTS].max()) for u in ups)
        mean = torch.zeros(len(groups), width)
        for u, p in zip(ups, example_weights(ups)):
            c = u.delta[COORDS]
            mean[:, : c.shape[1]] += p * c
        new = apply_round(state["global"], mean, groups, self.ctx.seed, rnd, self.server_lr, self.clip)
        synced = dict(state["synced"])
        for u in ups:  # a client that replied had applied every aggregate before this round's
            synced[u.client_id] = rnd - 1
        history = {**state["history"], rnd: mean}
        return Aggregate(new, {**state, "global": new, "history": history, "synced": synced})

    def client_train(
        self,
        model: Any,
        received: AdapterState,
        private: AdapterState,
        shard: Shard,
        spec: TrainSpec,
        seed: int,
        rnd: int,
        on_step: Callable[[int, int, float], None] | None = None,
        adapter: Adapter | None = None,
    ) -> tuple[AdapterState, dict[str, float], AdapterState]:
        """First-order local steps (with the adapter's auxiliary loss, e.g. a mixture's load
        balancing), then the projection of the update (module docstring)."""
        from dataclasses import replace

        keys = trainable_keys(private)
        groups = blocks_of({k: private[k].shape for k in keys})
        w = private
        for key in sorted(received, key=lambda s: int(s.rsplit(".", 1)[1]) if s.startswith(COORDS) else -1):
            if key.startswith(COORDS):  # catch up: the rounds this client missed, in order
                r = int(key.rsplit(".", 1)[1])
                w = apply_round(w, received[key], groups, self.ctx.seed, r, self.server_lr, self.clip)
        set_state_(model, w)
        params = select_trainable_(model, keys)
        sgd = replace(spec, optimizer="sgd", weight_decay=0.0)  # Ferret's local optimizer: plain SGD
        gen = torch_generator(seed, "train", rnd, shard.client_id)
        aux = adapter if adapter is not None else adapter_of(model)
        metrics = local_train_(
            model,
            params,
            TrainData(shard.train, shard.train_mask),
            sgd,
            gen,
            on_step=on_step,
            aux=lambda: aux.aux_loss(model),
        )
        trained = get_state(model)
        delta = {k: w[k] - trained[k] for k in keys}  # D = w - w_end
        coords, counts = project(delta, groups, self.bases, self.ctx.seed, rnd)
        return {COORDS: coords, COUNTS: counts}, metrics, w

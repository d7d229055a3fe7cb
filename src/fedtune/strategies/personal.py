"""Personalized collaboration: every client ends with its own model that still learns from the
others. CoMiGS (generalist experts shared, specialists and router kept on the client), PCL
(trust-weighted mixing of all clients' adapters) and TAC (k-means clusters of adapters)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedtune.adapters.base import Algebra
from fedtune.adapters.moe_lora import expert_index
from fedtune.codecs import serialize
from fedtune.errors import Problem
from fedtune.seeding import numpy_rng
from fedtune.strategies.base import (
    STRATEGIES,
    Aggregate,
    Capabilities,
    PeerScoring,
    StrategyBase,
    example_weights,
    sorted_updates,
    weighted_mean,
)
from fedtune.strategies.params import Count, NonNegativeCount, Positive
from fedtune.types import AdapterState, ClientUpdate, add_states

COMIGS_PRESETS = {"1G1S": 1, "2G": 2, "2S": 0}


@dataclass(frozen=True)
class PerClient(StrategyBase):
    """Plumbing for strategies whose server keeps one adapter per client:
    state = {"init": adapter, "clients": {id: adapter}, ...}; a client receives its own."""

    capabilities = Capabilities(has_global=False, personalized=True)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"init": global_state, "clients": {}}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return {cid: state["clients"].get(cid, state["init"]) for cid in client_ids}

    def trained(self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any]) -> dict[str, AdapterState]:
        """Every client's adapter after this round's local training (sent + delta)."""
        sent = self.configure(rnd, [u.client_id for u in updates], state)
        clients = dict(state["clients"])
        for u in updates:
            clients[u.client_id] = add_states(sent[u.client_id], u.delta)
        return clients


# -- CoMiGS --------------------------------------------------------------------------------------


@STRATEGIES.register("comigs")
@dataclass(frozen=True)
class CoMiGS(StrategyBase):
    """CoMiGS (arXiv:2409.13931): a mixture of LoRA experts per client; experts 0..G-1 are
    generalists (averaged by the server), the rest are specialists, which never leave the client,
    and so is the router. Router steps on the validation split alternate with expert steps
    (adapter.router_every / router_steps). Presets: 1G1S (1 generalist + 1 specialist), 2G (both
    shared; the router stays local), 2S (nothing shared: local mixtures). Clients may have
    different numbers of experts (adapter.experts: [2, 2, 4, 4]); the first G are shared."""

    preset: Literal["1G1S", "2G", "2S"] | None = None
    generalists: NonNegativeCount = 1
    weighting: Literal["uniform", "examples"] = "uniform"  # the paper averages uniformly

    capabilities = Capabilities(
        has_global=False, personalized=True, client_private=True, algebras=frozenset({Algebra.MIXTURE})
    )

    @property
    def num_generalists(self) -> int:
        return COMIGS_PRESETS[self.preset] if self.preset is not None else self.generalists

    def is_general(self, key: str) -> bool:
        i = expert_index(key)
        return i is not None and i < self.num_generalists

    def private_keys(self, state: AdapterState) -> set[str]:
        """Everything but the generalists: specialists, routers (learned or frozen)."""
        return {k for k in state if not self.is_general(k)}

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"global": {k: v for k, v in global_state.items() if self.is_general(k)}}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return {cid: state["global"] for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        if not updates or not state["global"]:
            return Aggregate(state["global"], state)
        ups = sorted_updates(updates)
        weights = example_weights(ups) if self.weighting == "examples" else [1.0 / len(ups)] * len(ups)
        new = add_states(state["global"], weighted_mean([u.delta for u in ups], weights))
        return Aggregate(new, {**state, "global": new})

    @classmethod
    def config_problems(cls, params: dict[str, Any], adapter: Any, codec: Any, secure: bool) -> list[Problem]:
        g = COMIGS_PRESETS.get(params.get("preset") or "", params.get("generalists", 1))
        counts = adapter.experts if isinstance(adapter.experts, list) else [adapter.experts]
        if g > min(counts):
            return [
                Problem(
                    "strategy.generalists",
                    g,
                    f"more generalists than the smallest client's experts (adapter.experts = {adapter.experts})",
                    f"use at most {min(counts)} generalists, or more experts",
                )
            ]
        return []


# -- PCL -----------------------------------------------------------------------------------------


def val_trust(loss: float) -> float:
    """PCL's 'val' trust score of a model: minus its perplexity on the scorer's validation blocks
    (the loss clipped at 50 so a diverged model scores very low, never -inf)."""
    return -math.exp(min(loss, 50.0))


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.double(), dim=1)


def weight_similarity(states: Sequence[AdapterState]) -> torch.Tensor:
    """PCL strategy 1: S_ij = sum over tensors of the row-wise cosines of the raw matrices,
    divided by the number of rows."""
    n = len(states)
    s = torch.zeros(n, n, dtype=torch.float64)
    rows = 0
    for key in sorted(states[0]):
        mats = [st[key].double().reshape(st[key].shape[0], -1) for st in states]
        rows += mats[0].shape[0]
        for i in range(n):
            for j in range(n):
                s[i, j] += torch.nn.functional.cosine_similarity(mats[i], mats[j], dim=1).sum()
    return s / max(rows, 1)


def topk_l1_distances(logits: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab: int) -> torch.Tensor:
    """PCL strategy 3: D_ij = sum over positions of ||l_i - l_j||_1 / positions, with each model's
    logits kept only at its top-k entries (zero elsewhere)."""
    n = len(logits)
    d = torch.zeros(n, n, dtype=torch.float64)
    positions = logits[0][0].shape[0] * logits[0][0].shape[1]
    for b in range(logits[0][0].shape[0]):  # one reference block at a time: [T, vocab] dense
        dense = []
        for vals, idx in logits:
            x = torch.zeros(vals.shape[1], vocab, dtype=torch.float64)
            dense.append(x.scatter_(1, idx[b], vals[b].double()))
        for i in range(n):
            for j in range(i + 1, n):
                dist = float((dense[i] - dense[j]).abs().sum())
                d[i, j] += dist
                d[j, i] += dist
    return d / positions


def pcl_weights(kind: str, scores: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """Row-softmax trust from a score matrix: 'weights' S (similarity), 'val' T = -perplexity,
    'predictions' -temperature * D / ||D_row||_1."""
    if kind == "predictions":
        norm = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return softmax_rows(-temperature * norm)
    return softmax_rows(scores)


@STRATEGIES.register("pcl")
@dataclass(frozen=True)
class PCL(PerClient):
    """PCL (arXiv:2404.09753): after local training, client i's adapter becomes sum_j W_ij theta_j
    (weights, not deltas), W = row-softmax of a trust score: 'weights' (row-wise cosine similarity
    of the adapters), 'val' (-perplexity of peer j's model on client i's validation split: every
    client receives every peer's adapter) or 'predictions' (-10 x row-normalised L1 distance of
    top-k logits on a shared reference set: a few validation blocks each client contributes).
    The server relays; the trust matrix is logged every round (round record 'trust')."""

    trust: Literal["weights", "val", "predictions"] = "weights"
    top_k: Count = 100
    temperature: Positive = 10.0
    reference_blocks: Count = 2
    val_blocks: Count = 16  # 'val': validation blocks each peer model is scored on
    warmup_rounds: NonNegativeCount = 0

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Trust from the adapters alone needs nothing from the clients; 'val' scores every peer
        on each client's validation split; 'predictions' also ships raw reference blocks."""
        return Capabilities(
            has_global=False,
            personalized=True,
            scores_peers=self.trust != "weights",
            raw_data=self.trust == "predictions",
        )

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        clients = self.trained(rnd, updates, state)
        ids = sorted(clients)
        new = {**state, "clients": clients}
        if rnd <= self.warmup_rounds or len(ids) < 2:
            return Aggregate(state["init"], new)
        states = [clients[c] for c in ids]
        scores, traffic, shared = self.scores(rnd, ids, states, peers)
        w = pcl_weights(self.trust, scores, self.temperature)
        rows = {u.client_id for u in updates}  # clients present this round take the mix
        for i, cid in enumerate(ids):
            if cid in rows:
                clients[cid] = weighted_mean(states, w[i].tolist())
        metrics = {"trust": [[round(float(x), 6) for x in row] for row in w], "trust_clients": ids}
        # each client's record: its adapter's payloads plus what scoring moved to and from it
        sent = {u.client_id: (u.bytes_up, u.bytes_down) for u in updates}
        per_client = {
            c: {"bytes_up": sent.get(c, (0, 0))[0] + up, "bytes_down": sent.get(c, (0, 0))[1] + down}
            for c, (up, down) in traffic.items()
        }
        up_total = sum(u for u, _ in traffic.values()) + shared[0]
        down_total = sum(d for _, d in traffic.values()) + shared[1]
        return Aggregate(state["init"], new, metrics, bytes_up=up_total, bytes_down=down_total, per_client=per_client)

    def scores(
        self, rnd: int, ids: list[str], states: list[AdapterState], engine: PeerScoring | None
    ) -> tuple[torch.Tensor, dict[str, tuple[int, int]], tuple[int, int]]:
        """(score matrix, each client's scoring bytes (up, down), bytes no one client's (up, down):
        the reference set's collection) for this round's trust; every number a payload's length."""
        n = len(ids)
        if self.trust == "weights":  # the server has every adapter already
            return weight_similarity(states), {}, (0, 0)
        if engine is None:
            raise ValueError(f"PCL trust {self.trust!r} needs the clients (an engine)")
        if self.trust == "val":
            losses = engine.peer_evaluate(dict(zip(ids, states)), split="val", max_blocks=self.val_blocks)
            # Python floats from the engine: the server's trust matrix lives on the host on purpose
            t = torch.tensor([[val_trust(losses[i][j]) for j in ids] for i in ids])
            sizes = [len(serialize(s)) for s in states]
            row = len(serialize({"val_loss": torch.zeros(n)}))  # a reply of n perplexities: a size, on the host
            traffic = {c: (row, sum(sizes) - sizes[i]) for i, c in enumerate(ids)}  # the peers' adapters down
            return t.double(), traffic, (0, 0)
        ref = engine.reference_blocks(self.reference_blocks)
        logits = engine.reference_logits(dict(zip(ids, states)), ref, self.top_k)
        vocab = int(max(int(idx.max()) for _, idx in logits.values()) + 1)
        d = topk_l1_distances([logits[c] for c in ids], vocab)
        ups = {c: len(serialize({"v": v.half(), "i": i.to(torch.int32)})) for c, (v, i) in logits.items()}
        if rnd == 1 + self.warmup_rounds:  # the shared reference set is collected and sent out once
            ref_bytes = len(serialize({"tokens": ref.to(torch.int32)}))
            return d, {c: (ups[c], ref_bytes) for c in ids}, (ref_bytes, 0)
        return d, {c: (ups[c], 0) for c in ids}, (0, 0)


# -- TAC -----------------------------------------------------------------------------------------


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, best of n_init; labels renumbered in order of first
    appearance (so the same partition always gets the same labels)."""
    n = x.shape[0]
    k = min(k, n)
    best, best_inertia = np.zeros(n, dtype=int), np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(1) for c in centers], axis=0)
            total = d2.sum()
            centers.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
        c = np.stack(centers)
        labels = np.zeros(n, dtype=int)
        for _ in range(iters):
            labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            moved = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(moved, c):
                break
            c = moved
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    order = {old: new for new, old in enumerate(dict.fromkeys(best.tolist()))}
    return np.array([order[v] for v in best.tolist()])


def flatten(state: AdapterState) -> np.ndarray:
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)]).numpy()


@STRATEGIES.register("tac")
@dataclass(frozen=True)
class TAC(PerClient):
    """TAC / FL-TAC (arXiv:2404.15384): k-means over the clients' trained adapters (flattened),
    example-weighted averaging inside each cluster; each client receives its cluster's adapter.
    The cluster assignment is logged every round (round record 'clusters')."""

    clusters: Count = 2
    n_init: Count = 10

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        clients = self.trained(rnd, updates, state)
        ups = sorted_updates(updates)
        if not ups:
            return Aggregate(state["init"], {**state, "clients": clients})
        ids = [u.client_id for u in ups]
        x = np.stack([flatten(clients[c]) for c in ids])
        labels = kmeans(x, self.clusters, numpy_rng(self.ctx.seed, "tac", rnd), self.n_init)
        for j in sorted(set(labels.tolist())):
            members = [u for u, lab in zip(ups, labels) if lab == j]
            mean = weighted_mean([clients[u.client_id] for u in members], example_weights(members))
            for u in members:
                clients[u.client_id] = mean
        metrics = {"clusters": dict(zip(ids, labels.tolist()))}
        return Aggregate(state["init"], {**state, "clients": clients}, metrics)

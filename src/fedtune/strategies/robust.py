"""Byzantine-robust aggregation of client updates: Krum and Multi-Krum (Blanchard et al., NeurIPS
2017), coordinate-wise median and trimmed mean (Yin et al., ICML 2018), and norm bounding (Sun et
al., arXiv:1911.07963), and a Bristle-style performance-weighted integrator (Verbraeken, de Vos,
Pouwelse, arXiv:2110.11006; `bristle`, below).

Where the rule is applied (`space`):
- 'update': on the transmitted update vectors (every delta tensor flattened): right when the
  factors are shared, so the update is linear in what is sent (FFA-LoRA's B, Fed-SB's R).
- 'dw': on the effective update dW_k = s (B_k A_k - B A) of every LoRA module (B, A: the global
  factors), flattened over modules, so a robust rule sees what actually changes the model even when
  both factors train (FedIT). The robust dense dW is added to s B A and cut back to rank r by SVD
  (Eckart-Young, as FlexLoRA), so the result is again a rank-r LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from fedtune.codecs import serialize
from fedtune.seeding import numpy_rng
from fedtune.strategies.base import (
    EXACT_LORA,
    STRATEGIES,
    Aggregate,
    Capabilities,
    Combined,
    GlobalModel,
    PeerScoring,
    example_weights,
)
from fedtune.strategies.hetero import svd_factors
from fedtune.strategies.lora_math import A_SUFFIX, B_SUFFIX, lora_modules
from fedtune.strategies.params import Count, NonNegativeCount, Positive
from fedtune.types import AdapterState, ClientUpdate, add_states


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: the sum of squared distances to its n - f - 2 nearest other rows."""
    n = x.shape[0]
    d = torch.cdist(x, x).pow(2)
    k = max(1, n - f - 2)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).values.sum(dim=1)


def robust_mean(
    x: torch.Tensor, rule: str, f: int, trim: float, max_norm: float | None, w: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """(robust aggregate of the rows of x [n, d], rows it kept). `w`: example weights (sum 1)."""
    n = x.shape[0]
    rows = list(range(n))
    if rule == "mean":
        return (w[:, None] * x).sum(0), rows
    if rule in ("krum", "multikrum"):
        scores = krum_scores(x, f)
        m = 1 if rule == "krum" else max(1, n - f)
        keep = sorted(scores.argsort()[:m].tolist())
        return x[keep].mean(0), keep
    if rule == "median":
        return x.median(dim=0).values if n % 2 else x.sort(dim=0).values[n // 2 - 1 : n // 2 + 1].mean(0), rows
    if rule == "trimmed_mean":
        cut = int(trim * n)
        if 2 * cut >= n:
            cut = (n - 1) // 2
        return x.sort(dim=0).values[cut : n - cut].mean(0), rows
    if rule == "norm_bound":
        norms = x.norm(dim=1)
        bound = max_norm if max_norm is not None else float(norms.median())
        scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
        return (w[:, None] * (x * scale[:, None])).sum(0), rows
    raise ValueError(f"unknown robust rule {rule!r}")


def flatten(states: Sequence[AdapterState], keys: list[str]) -> torch.Tensor:
    return torch.stack([torch.cat([s[k].reshape(-1).double() for k in keys]) for s in states])


def unflatten(v: torch.Tensor, like: AdapterState, keys: list[str]) -> AdapterState:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = v[i : i + n].reshape(like[k].shape).float()
        i += n
    return out


@STRATEGIES.register("robust")
@dataclass(frozen=True)
class Robust(GlobalModel):
    """Byzantine-robust aggregation: `rule` krum, multikrum, median, trimmed_mean, norm_bound
    (or mean, for comparison), for `f` assumed attackers; `space` update or dw (module docstring)."""

    rule: Literal["krum", "multikrum", "median", "trimmed_mean", "norm_bound", "mean"] = "multikrum"
    f: NonNegativeCount = 1
    trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    max_norm: Positive | None = None
    space: Literal["update", "dw"] = "update"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Robust statistics of the dense products (space dw) need LoRA factors."""
        return Capabilities(algebras=EXACT_LORA) if self.space == "dw" else Capabilities()

    def too_few(self, k: int) -> str | None:
        """Why `rule` cannot run on k updates, or None."""
        if self.rule in ("krum", "multikrum") and k < 2 * self.f + 3:
            return f"{self.rule} needs n >= 2f + 3 = {2 * self.f + 3} updates for f = {self.f}, got {k}"
        if self.rule == "trimmed_mean" and int(self.trim * k) == 0:
            return f"trimmed_mean with trim = {self.trim:g} removes nothing from {k} updates (int(trim * n) = 0)"
        return None

    def sample_problems(self, k: int) -> list[Any]:
        from fedtune.errors import Problem

        why = self.too_few(k)
        if why is None:
            return []
        field = "strategy.f" if self.rule in ("krum", "multikrum") else "strategy.trim"
        fix = "lower strategy.f, or sample more clients" if field == "strategy.f" else "raise strategy.trim"
        return [Problem(field, self.f if field == "strategy.f" else self.trim, why, fix)]

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        why = self.too_few(len(updates)) if updates else None
        if why is not None:  # e.g. dropouts left too few: keep the model, say why
            return Aggregate(state["global"], state, {"skipped": f"robust aggregation refused: {why}"})
        return super().aggregate(rnd, updates, state, peers)

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        glob = state["global"]
        w = torch.tensor(example_weights(updates), dtype=torch.float64)
        ids = [u.client_id for u in updates]
        if self.space == "update":
            keys = sorted(updates[0].delta)
            agg, kept = robust_mean(
                flatten([u.delta for u in updates], keys), self.rule, self.f, self.trim, self.max_norm, w
            )
            new = add_states(glob, unflatten(agg, updates[0].delta, keys))
        else:
            new, kept = self.combine_dw(glob, updates, w)
        return new, {}, {"robust_kept": [ids[i] for i in kept]}

    def combine_dw(
        self, glob: AdapterState, updates: list[ClientUpdate], w: torch.Tensor
    ) -> tuple[AdapterState, list[int]]:
        s = self.ctx.lora_scale
        mods = lora_modules(glob)
        base = {m: glob[m + B_SUFFIX].double() @ glob[m + A_SUFFIX].double() for m in mods}
        dws = []
        for u in updates:
            dw = {}
            for m in mods:
                b = glob[m + B_SUFFIX].double() + u.delta.get(m + B_SUFFIX, torch.zeros(1)).double()
                a = glob[m + A_SUFFIX].double() + u.delta.get(m + A_SUFFIX, torch.zeros(1)).double()
                dw[m] = s * (b @ a - base[m])
            dws.append(dw)
        agg, kept = robust_mean(flatten(dws, mods), self.rule, self.f, self.trim, self.max_norm, w)
        robust = unflatten(agg, dws[0], mods)
        new = dict(glob)
        for m in mods:
            rank = glob[m + A_SUFFIX].shape[0]
            new[m + A_SUFFIX], new[m + B_SUFFIX], _ = svd_factors(s * base[m] + robust[m].double(), rank, s)
        return new, kept


def integrator_weights(base: dict[str, float], candidates: list[dict[str, float]]) -> torch.Tensor:
    """Bristle-style integration weights from the losses of the current model (`base`, per
    reference domain) and of each candidate model (current + one update): per domain c, the gain
    g_kc = max(0, L_c(base) - L_c(candidate k)) is normalised over the candidates; each domain has
    an equal say, w_k = mean_c g_kc / sum_j g_jc (domains nobody improves drop out). All zero when
    no candidate improves any domain."""
    domains = sorted(base)
    g = torch.tensor([[max(0.0, base[c] - cand[c]) for c in domains] for cand in candidates], dtype=torch.float64)
    col = g.sum(0)
    used = col > 0
    if not bool(used.any()):
        return torch.zeros(len(candidates), dtype=torch.float64)
    return (g[:, used] / col[used]).mean(1)


@STRATEGIES.register("bristle")
@dataclass(frozen=True)
class Bristle(GlobalModel):
    """Bristle-style robust aggregation, adapted from output layers and classes to adapters and
    text domains (the paper's exact weighting formula could not be retrieved; this is our reading):

    1. prioritizer: rank the updates by their norm (the candidate's distance to the current model),
       score the `keep` closest plus `explore` others drawn at random (seeded);
    2. integrator: the server scores the current model and every scored candidate (current +
       update) on its trusted reference set, a few validation blocks each client contributes
       (in a deployment: a consenting party's data or a public corpus), domain by domain; an update
       is weighted by its loss improvement per domain (`integrator_weights`), so an update that
       makes no domain better gets weight 0 and the model does not move if none helps.

    Needs the engine (server-side scoring), so it runs in-process."""

    keep: Count | None = None  # None: score every update
    explore: NonNegativeCount = 0
    reference_blocks: Count = 2

    # the server scores candidates on reference blocks that clients contribute (raw tokens)
    capabilities = Capabilities(scores_peers=True, raw_data=True)

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        if not updates:
            return Aggregate(state["global"], state)
        engine = peers
        if engine is None:
            raise ValueError("bristle scores candidate models on the server's reference set: it needs the engine")
        ups = sorted(updates, key=lambda u: u.client_id)
        glob = state["global"]
        norms = [math.sqrt(sum(float(v.double().pow(2).sum()) for v in u.delta.values())) for u in ups]
        order = sorted(range(len(ups)), key=lambda i: (norms[i], ups[i].client_id))
        near = order[: self.keep] if self.keep is not None else order
        rest = order[len(near) :]
        if rest and self.explore > 0:
            pick = numpy_rng(self.ctx.seed, "bristle-explore", rnd).permutation(len(rest))[: self.explore]
            near = near + [rest[i] for i in sorted(pick)]
        scored = sorted(near)
        cands = {"current": glob, **{ups[i].client_id: add_states(glob, ups[i].delta) for i in scored}}
        losses = engine.reference_losses(cands, self.reference_blocks)
        w = integrator_weights(losses["current"], [losses[ups[i].client_id] for i in scored])
        new = dict(glob)
        if float(w.sum()) > 0:
            keys = sorted(ups[0].delta)
            mix = {
                k: reduce(torch.add, [float(w[j]) * ups[i].delta[k].double() for j, i in enumerate(scored)])
                for k in keys
            }
            new = add_states(glob, {k: v.float() for k, v in mix.items()})
        weights = {ups[i].client_id: round(float(w[j]), 6) for j, i in enumerate(scored)}
        metrics: dict[str, Any] = {
            "bristle_weights": weights,
            "robust_kept": sorted(c for c, x in weights.items() if x > 0),
        }
        up = 0
        if rnd == 1:  # the reference blocks reach the server once
            ref = engine.reference_blocks(self.reference_blocks)
            up = len(serialize({"tokens": ref.to(torch.int32)}))
        return Aggregate(new, {**state, "global": new}, metrics, bytes_up=up)

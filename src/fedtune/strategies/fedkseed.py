"""FedKSeed (Qin et al., arXiv:2312.06353): zeroth-order federated fine-tuning with a finite pool of
K random seeds, so a round moves scalars instead of tensors.

- Every party derives the same K seeds from the run seed; seed j regenerates a direction z_j
  (one N(0, I) tensor per trained tensor, in key order).
- Global model = replay: w = w0 - lr * sum_j G_j z_j over the seeds with G_j != 0 in increasing j,
  from the initial weights w0 (every party has them: the seeded adapter init) and the K
  accumulated scalars G, the only thing the server sends (4 K bytes: 16 KB for K = 4096).
- Client, per local step t: draw seed j_t (uniformly; FedKSeed-Pro: with the server's
  probabilities), SPSA g_t = (L(w + eps z) - L(w - eps z)) / (2 eps) on a batch, w <- w - lr g_t z.
  It uploads only the scalars g_1..g_tau, in step order: the seed draws come from a generator
  derived from (run seed, round, client), which the server regenerates, so no indices travel.
  `one_byte: true` sends each scalar as one byte (sign + 7-bit log magnitude, "Just One Byte",
  arXiv:2306.10015; the paper's 16 ln|g| in [-127, 127] plus a sign needs 9 bits, so the log
  resolution here is 1/8).
- Server: G_j += sum_k p_k g_{k,t} for every step t of client k that drew seed j.
- FedKSeed-Pro (`pro: true`): p(seed j) = softmax(minmax(mean_history |clip(g, +-1000)|)), rounded
  to fp16 (clients use exactly those values) and sent with G; the downlink codec decides its wire
  width (the identity codec sends every float tensor as fp32: 4 bytes a seed, `downlink_codec: fp16`
  halves G's and p's bytes).

- `full: true` (small models): the perturbed tensors are the base weights of every adapted
  linear layer (use `adapter.target_modules: all-linear` for all of them), carried as dense
  offsets `<module>.base_delta` from the pretrained W0 (the LoRA factors stay at their init, so
  with B = 0 they add nothing). A direction then has as many entries as those weights, so
  replay costs grow with the model: adapter-only (the default) is the mode for larger models.
  The export folds the offsets into a PEFT LoRA of full rank.

Losses are computed in fp32 (a bf16 loss is too coarse for eps-size differences), dropout off.
The replay is one function used by server and clients, so both hold bit-identical models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.client.train import batch_indices, lm_loss
from fedtune.data.blocks import Shard
from fedtune.models.adapters import BASE_DELTA, select_trainable_, set_state_, trainable_keys
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

G_KEY, P_KEY, SCALARS = "fedkseed.G", "fedkseed.p", "fedkseed.g"


def seed_pool(seed: int, k: int) -> list[int]:
    return [derive_seed(seed, "fedkseed-pool", j) for j in range(k)]


def direction(seed: int, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """z for one seed: a standard normal tensor per key, in sorted key order."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=gen) for k in sorted(shapes)}


def replay(w0: AdapterState, g: torch.Tensor, pool: Sequence[int], lr: float, keys: Sequence[str]) -> AdapterState:
    """w = w0 - lr * sum_j G_j z_j (seeds with G_j != 0, increasing j); other keys stay w0."""
    w = {k: v.clone() for k, v in w0.items()}
    shapes = {k: w0[k].shape for k in keys}
    for j in torch.nonzero(g).flatten().tolist():
        z = direction(pool[j], shapes)
        for k in keys:
            w[k].sub_(lr * float(g[j]) * z[k])
    return w


def one_byte(g: torch.Tensor) -> torch.Tensor:
    """int8 code: sign * (1 + clamp(round(8 ln|g|) + 64, 0, 126)); 0 for g == 0."""
    mag = torch.clamp(torch.round(8 * torch.log(g.abs().clamp_min(1e-30))) + 64, 0, 126) + 1
    return (torch.sign(g) * mag).to(torch.int8)


def from_one_byte(c: torch.Tensor) -> torch.Tensor:
    c = c.to(torch.float32)
    return torch.sign(c) * torch.exp((c.abs() - 1 - 64) / 8) * (c != 0)


def seed_draws(gen: torch.Generator, n: int, k: int, probs: torch.Tensor | None) -> list[int]:
    if probs is None:
        return torch.randint(0, k, (n,), generator=gen).tolist()
    return torch.multinomial(probs.double(), n, replacement=True, generator=gen).tolist()


def pro_probabilities(abs_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """softmax(minmax(mean |clip(g)|)) over seeds (unseen seeds: mean 0)."""
    mean = torch.where(count > 0, abs_sum / count.clamp_min(1), torch.zeros_like(abs_sum))
    span = mean.max() - mean.min()
    norm = (mean - mean.min()) / span if float(span) > 0 else torch.zeros_like(mean)
    return torch.softmax(norm.double(), dim=0).float()


@STRATEGIES.register("fedkseed")
@dataclass(frozen=True)
class FedKSeed(StrategyBase):
    """FedKSeed: zeroth-order local steps on K shared seeds; only scalars travel (see the module
    docstring). `pro`: FedKSeed-Pro seed probabilities; `one_byte`: one byte per scalar."""

    num_seeds: Count = 4096
    eps: Positive = 5e-4
    lr: Positive | None = None  # default: train.lr
    pro: bool = False
    one_byte: bool = False
    full: bool = False  # perturb the adapted layers' base weights instead of the adapter

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Every client keeps w0 (the shared seeded init) to replay from; zeroth-order client
        steps; in full mode offsets of the base weights."""
        return Capabilities(client_private=True, client_step=True, base_offsets=self.full)

    @property
    def step(self) -> float:
        return self.lr if self.lr is not None else self.ctx.train_lr

    def private_keys(self, state: AdapterState) -> set[str]:
        return set(state)

    def start(self, w0: AdapterState) -> AdapterState:
        """The replay origin: the adapter init, plus zero base-weight offsets in full mode."""
        if not self.full:
            return w0
        from fedtune.strategies.merge import with_zero_base

        return with_zero_base(w0)

    def perturbed(self, w0: AdapterState) -> list[str]:
        """The keys the seeds perturb: base-weight offsets (full) or the trainable adapter tensors."""
        return sorted(k for k in w0 if k.endswith(BASE_DELTA)) if self.full else trainable_keys(w0)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        k = self.num_seeds
        global_state = self.start(global_state)
        return {
            "w0": global_state,
            "G": torch.zeros(k),
            "abs_sum": torch.zeros(k),
            "count": torch.zeros(k),
            "global": global_state,
        }

    def probs(self, state: dict[str, Any]) -> torch.Tensor | None:
        return pro_probabilities(state["abs_sum"], state["count"]) if self.pro else None

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        msg = {G_KEY: state["G"]}
        probs = self.probs(state)
        if probs is not None:
            msg[P_KEY] = probs.half()
        return {cid: msg for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        if not updates:
            return Aggregate(state["global"], state)
        ups = sorted_updates(updates)
        probs = self.probs(state)
        probs = probs.half().float() if probs is not None else None  # exactly what clients received
        g, abs_sum, count = state["G"].clone(), state["abs_sum"].clone(), state["count"].clone()
        for u, p in zip(ups, example_weights(ups)):
            scalars = self.decode_scalars(u.delta[SCALARS])
            draws = seed_draws(
                torch_generator(self.ctx.seed, "fedkseed-draws", rnd, u.client_id), len(scalars), self.num_seeds, probs
            )
            for j, s in zip(draws, scalars.tolist()):
                g[j] += p * s
                abs_sum[j] += min(abs(s), 1000.0)
                count[j] += 1
        keys = self.perturbed(state["w0"])
        new = replay(state["w0"], g, seed_pool(self.ctx.seed, self.num_seeds), self.step, keys)
        return Aggregate(new, {**state, "G": g, "abs_sum": abs_sum, "count": count, "global": new})

    @classmethod
    def config_problems(cls, params: dict[str, Any], adapter: Any, codec: Any, secure: bool) -> list[Any]:
        from fedtune.errors import Problem

        if codec is not None and (codec.name != "identity" or codec.params()):
            return [
                Problem(
                    "codec",
                    codec.name,
                    "FedKSeed replays the model from the accumulated scalars, which must arrive exactly",
                    "use codec: identity (strategy.one_byte: true compresses the uplink scalars)",
                )
            ]
        return []

    def decode_scalars(self, t: torch.Tensor) -> torch.Tensor:
        return from_one_byte(t) if self.one_byte else t.float()

    # -- the client side (the engine calls this instead of the first-order client round) ----------

    def client_train(
        self,
        model: Any,
        received: AdapterState,
        private: AdapterState,
        shard: Shard,
        spec: Any,
        seed: int,
        rnd: int,
        on_step: Callable[[int, int, float], None] | None = None,
        adapter: Any = None,
    ) -> tuple[AdapterState, dict[str, float], AdapterState]:
        """Zeroth-order steps on the LM loss alone (`adapter`, the run's adapter, adds no
        auxiliary loss here: the scalar differences estimate the task loss's directional
        derivatives)."""
        import time

        t0 = time.perf_counter()
        w0 = self.start(private)
        keys = self.perturbed(w0)
        pool = seed_pool(self.ctx.seed, self.num_seeds)
        w = replay(w0, received[G_KEY], pool, self.step, keys)  # the global model, bit-identical
        set_state_(model, w)
        shapes = {k: w0[k].shape for k in keys}
        if self.full:  # perturb the base weights in place (set_state_ put them at W0 + offset)
            modules = dict(model.named_modules())
            select_trainable_(model, [])
            params = {}
            for k in keys:
                layer = modules[k[: -len(BASE_DELTA)]]
                weight = layer.base_layer.weight
                params[k] = weight.T if getattr(layer, "fan_in_fan_out", False) else weight  # a view: [out, in]
        else:
            params = dict(zip(sorted(keys), select_trainable_(model, keys)))
        probs = received[P_KEY].float() if self.pro else None
        n = spec.num_steps(int(shard.train.shape[0]))
        draws = seed_draws(
            torch_generator(self.ctx.seed, "fedkseed-draws", rnd, shard.client_id), n, self.num_seeds, probs
        )
        batches = batch_indices(
            int(shard.train.shape[0]), spec.batch_size, torch_generator(seed, "train", rnd, shard.client_id)
        )
        model.eval()  # no dropout: both perturbed losses see the same function
        scalars, losses = [], []
        with torch.no_grad():
            for t, j in enumerate(draws):
                rows = next(batches)
                batch, mask = shard.train[rows], shard.train_mask[rows] if shard.train_mask is not None else None
                # drawn on the host (bit-identical to the server's replay), used where the weights are
                z = {k: v.to(params[k].device) for k, v in direction(pool[j], shapes).items()}
                for k, p in params.items():
                    p.add_(self.eps * z[k])
                plus = float(lm_loss(model, batch, False, mask=mask))
                for k, p in params.items():
                    p.sub_(2 * self.eps * z[k])
                minus = float(lm_loss(model, batch, False, mask=mask))
                for k, p in params.items():
                    p.add_(self.eps * z[k])
                g = (plus - minus) / (2 * self.eps)
                if not math.isfinite(g):
                    from fedtune.errors import TrainingDivergedError

                    raise TrainingDivergedError(f"zeroth-order loss is not finite at local step {t}; lower the lr")
                sent = float(from_one_byte(one_byte(torch.tensor([g])))[0]) if self.one_byte else g
                for k, p in params.items():
                    p.sub_(self.step * sent * z[k])
                scalars.append(g)
                losses.append((plus + minus) / 2)
                if on_step is not None:
                    on_step(t + 1, n, losses[-1])
        vec = torch.tensor(scalars, dtype=torch.float32)
        payload = {SCALARS: one_byte(vec) if self.one_byte else vec}
        metrics = {
            "train_loss": sum(losses) / len(losses),
            "train_last_loss": losses[-1],
            "steps": float(n),
            "train_seconds": time.perf_counter() - t0,
        }
        return payload, metrics, private

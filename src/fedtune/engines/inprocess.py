"""The default engine: one process, the base model loaded once, clients run in turn with their
adapters swapped in and out. Payloads are really encoded and decoded, so bytes are measured."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedtune.adapters.moe_lora import is_moe, set_expert_count_
from fedtune.client.round import client_round
from fedtune.client.train import TrainSpec
from fedtune.data.blocks import Shard
from fedtune.evaluation.metrics import evaluate_blocks
from fedtune.models.adapters import set_state_
from fedtune.secagg import mask, to_fixed
from fedtune.seeding import numpy_rng, torch_generator
from fedtune.types import AdapterState, ClientFailure, ClientUpdate

StepCallback = Callable[[str, int, int, float], None]


class InProcessEngine:
    """Runs client rounds sequentially on one shared model."""

    def __init__(
        self,
        model: Any,
        shards: Mapping[str, Shard],
        codec: Any,
        spec: TrainSpec,
        seed: int,
        penalty: Any = None,
        *,
        eval_shards: Mapping[str, Shard] | None = None,
        eval_batch_size: int = 8,
        private_init: Mapping[str, AdapterState] | None = None,
        expert_counts: Mapping[str, int] | None = None,
        client_fn: Any = None,
        dropout: float = 0.0,
        stragglers: tuple[float, float, float | None] = (0.0, 4.0, None),
        attack: Any = None,
        secure_aggregation: bool = False,
    ):
        self.model = model
        # client-side state that never leaves a client (CoMiGS specialists, routers): the
        # initial values per client, and what each client holds now (checkpointed by the recipe)
        self.private_init = dict(private_init or {})
        self.private: dict[str, AdapterState] = {}
        self.expert_counts = dict(expert_counts or {})
        self.client_fn = client_fn  # a strategy's own client update (FedKSeed's zeroth-order steps)
        self.dropout = dropout  # fault injection: the chance a sampled client never replies
        # straggler injection: (chance a client is slow this round, slowest slowdown, deadline), in
        # units of a normal client's round time (simulated, so runs stay reproducible)
        self.stragglers = stragglers
        self.attack = attack  # attack injection: (kind, scale, attacker ids) or None
        self.secure_aggregation = secure_aggregation  # uploads pairwise-masked (fedtune.secagg)
        # under secure aggregation: what a strategy does on the client before masking (DP-FedAvg's
        # clip + noise share: (delta, rnd, cid, participants) -> delta) and a client's weight in the sum
        self.client_transform: Callable[..., AdapterState] | None = None
        self.secure_weight: Callable[[int], float] = float
        self.penalty = penalty
        self.eval_shards = eval_shards if eval_shards is not None else shards
        self.eval_batch_size = eval_batch_size
        self.collected_bytes = 0
        self.shards = shards
        self.codec = codec
        self.down_codec = codec  # the recipe sets the downlink codec when it differs
        self.spec = spec
        self.seed = seed

    def run_clients(
        self,
        rnd: int,
        payloads: Mapping[str, bytes],
        codec_states: dict[str, Any],
        on_step: StepCallback | None = None,
    ) -> tuple[list[ClientUpdate | ClientFailure], dict[str, Any]]:
        """Each client decodes its downlink payload, trains, and encodes its delta (uplink).

        Returns the replies and the updated per-client codec states.
        """
        replies: list[ClientUpdate | ClientFailure] = []
        states = dict(codec_states)
        dropped = {
            c
            for c in payloads
            if self.dropout > 0 and float(numpy_rng(self.seed, "dropout", rnd, c).random()) < self.dropout
        }
        times = {c: self.sim_time(rnd, c) for c in payloads if c not in dropped}
        deadline = self.stragglers[2]
        late = {c for c, t in times.items() if deadline is not None and t > deadline}
        participants = sorted(c for c in times if c not in late)  # who masks with whom
        for cid, payload in payloads.items():
            if cid in dropped:
                replies.append(ClientFailure(cid, "no reply (injected dropout)", len(payload)))
                continue
            if cid in late:  # the server closed the round first (the client's work is wasted)
                replies.append(
                    ClientFailure(
                        cid,
                        f"missed the deadline (simulated {times[cid]:.2f} > {deadline:g} client times)",
                        len(payload),
                    )
                )
                continue
            shard = self.shards[cid]
            t0 = time.perf_counter()
            received, _ = self.down_codec.decode(payload, None)
            cb = (lambda s, n, loss, cid=cid: on_step(cid, s, n, loss)) if on_step else None
            if self.client_fn is not None:
                delta, metrics, self.private[cid] = self.client_fn(
                    self.model, received, self.private_of(cid), shard, self.spec, self.seed, rnd, cb
                )
            else:
                delta, metrics, self.private[cid] = client_round(
                    self.model,
                    received,
                    shard,
                    self.spec,
                    self.seed,
                    rnd,
                    cb,
                    self.penalty,
                    private=self.private_of(cid),
                    experts=self.expert_counts.get(cid),
                )
            if self.attack is not None and cid in self.attack[2]:
                delta = poison(delta, self.attack[0], self.attack[1], torch_generator(self.seed, "attack", rnd, cid))
            if self.secure_aggregation:
                if self.client_transform is not None:
                    delta = self.client_transform(delta, rnd, cid, participants)
                fixed = to_fixed(delta, self.secure_weight(shard.num_examples))
                delta = mask(fixed, cid, participants, self.seed, rnd)
            up, states[cid] = self.codec.encode(
                delta, states.get(cid), torch_generator(self.seed, "codec-up", rnd, cid)
            )
            metrics["client_seconds"] = time.perf_counter() - t0
            if self.stragglers[0] > 0 or deadline is not None:
                metrics["sim_time"] = times[cid]  # in normal client times (1.0 unless a straggler)
            for st in states[cid] or []:  # what an adaptive codec decided (AQUILA: bits, skipped)
                if isinstance(st, dict):
                    metrics.update(st.get("report", {}))
            # the server sees exactly what was on the wire (a stateful decoder keeps one state per client)
            delta_seen, states["dec:" + cid] = self.codec.decode(up, states.get("dec:" + cid))
            replies.append(ClientUpdate(cid, delta_seen, shard.num_examples, metrics, len(up), len(payload)))
        return replies, states

    def sim_time(self, rnd: int, cid: str) -> float:
        """Client cid's simulated round time in normal client times (seeded per round and client)."""
        fraction, slowdown, _ = self.stragglers
        if fraction <= 0:
            return 1.0
        rng = numpy_rng(self.seed, "straggler", rnd, cid)
        slow, u = rng.random() < fraction, rng.random()
        return 1.0 + (slowdown - 1.0) * float(u) if slow else 1.0

    def private_of(self, cid: str) -> AdapterState:
        return self.private.get(cid, self.private_init.get(cid, {}))

    def _load(self, cid: str, state: AdapterState) -> None:
        """Client cid's model: the state it was sent plus what it keeps privately."""
        if is_moe(self.model):
            set_expert_count_(self.model, self.expert_counts.get(cid))
        set_state_(self.model, {**self.private_of(cid), **state})

    def evaluate(self, states: Mapping[str, AdapterState], split: str = "test") -> dict[str, dict[str, float]]:
        """Each client's loss/ppl on its own `split` ('test', 'val'; 'ood' = the mixture of every
        client's test data) under the state given for it (plus its private state)."""
        out: dict[str, dict[str, float]] = {}
        shared: dict[int, dict[str, float]] = {}  # OOD data is the same for all: score a shared model once
        for cid, state in states.items():
            alone = not self.private_of(cid) and cid not in self.expert_counts
            if split == "ood" and alone and id(state) in shared:
                out[cid] = dict(shared[id(state)])
                continue
            self._load(cid, state)
            blocks = self.ood_blocks() if split == "ood" else getattr(self.eval_shards[cid], split)
            out[cid] = evaluate_blocks(self.model, blocks, self.eval_batch_size, self.spec.bf16)
            if split == "ood" and alone:
                shared[id(state)] = out[cid]
        return out

    def ood_blocks(self) -> torch.Tensor:
        """Out-of-distribution test set: the same number of test blocks from every client."""
        n = min(int(s.test.shape[0]) for s in self.eval_shards.values())
        return torch.cat([s.test[:n] for s in self.eval_shards.values()])

    def reference_blocks(self, per_client: int) -> torch.Tensor:
        """A shared reference set: the first `per_client` validation blocks of every client
        (contributed with consent, as PCL's reference set is built from each domain's data)."""
        parts = [(s.val if s.val.shape[0] > 0 else s.train)[:per_client] for s in self.eval_shards.values()]
        return torch.cat(parts)

    def reference_losses(self, states: Mapping[str, AdapterState], per_client: int) -> dict[str, dict[str, float]]:
        """The server's scoring of candidate models on its trusted reference set (the first
        `per_client` validation blocks each client contributes), per contributing client:
        {candidate: {client: loss}}."""
        out: dict[str, dict[str, float]] = {}
        for name, state in states.items():
            set_state_(self.model, state)
            out[name] = {
                cid: evaluate_blocks(
                    self.model,
                    (s.val if s.val.shape[0] > 0 else s.train)[:per_client],
                    self.eval_batch_size,
                    self.spec.bf16,
                )["loss"]
                for cid, s in self.eval_shards.items()
            }
        return out

    def peer_evaluate(
        self, states: Mapping[str, AdapterState], split: str = "val", max_blocks: int | None = None
    ) -> dict[str, dict[str, float]]:
        """On each client i, the loss of every peer model j on i's own `split` (PCL's validation
        trust): {i: {j: loss}}. Client i evaluates with j's shared state (its private part stays
        with j). The peers' states travel to i: the caller counts those bytes."""
        out: dict[str, dict[str, float]] = {}
        for j, state in states.items():
            if is_moe(self.model):
                set_expert_count_(self.model, self.expert_counts.get(j))
            set_state_(self.model, {**self.private_of(j), **state})
            for i in states:
                blocks = getattr(self.eval_shards[i], split)
                if blocks.shape[0] == 0:
                    blocks = self.eval_shards[i].train[: self.eval_batch_size]
                blocks = blocks[:max_blocks]
                out.setdefault(i, {})[j] = evaluate_blocks(self.model, blocks, self.eval_batch_size, self.spec.bf16)[
                    "loss"
                ]
        return out

    @torch.no_grad()
    def reference_logits(self, states: Mapping[str, AdapterState], blocks: torch.Tensor, k: int) -> dict[str, Any]:
        """Each client's model's top-k logits on a shared reference set (PCL's prediction
        trust): {client: (values [N, T, k], indices [N, T, k])}, computed on the client."""
        out = {}
        for cid, state in states.items():
            self._load(cid, state)
            vals, idx = [], []
            for i in range(0, int(blocks.shape[0]), self.eval_batch_size):
                logits = self.model(input_ids=blocks[i : i + self.eval_batch_size]).logits.float()
                top = logits.topk(k, dim=-1)
                vals.append(top.values)
                idx.append(top.indices)
            out[cid] = (torch.cat(vals), torch.cat(idx))
        return out


def attackers(client_ids: list[str], fraction: float, seed: int) -> set[str]:
    """round(fraction * n) clients chosen by a seeded permutation (the same in every round)."""
    k = round(fraction * len(client_ids))
    order = numpy_rng(seed, "attackers").permutation(len(client_ids))
    return {sorted(client_ids)[i] for i in order[:k]}


def poison(delta: AdapterState, kind: str, scale: float, gen: torch.Generator) -> AdapterState:
    """A model-poisoning attacker's update."""
    if kind == "sign_flip":
        return {k: -scale * v if v.is_floating_point() else v for k, v in delta.items()}
    if kind == "scale":
        return {k: scale * v if v.is_floating_point() else v for k, v in delta.items()}
    if kind == "gaussian":
        return {
            k: scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in delta.items()
        }
    return delta  # 'data' poisons the training text instead


def corrupt_shard(shard: Shard, seed: int) -> Shard:
    """Data poisoning: the attacker's training blocks become random tokens of the same vocabulary."""
    from dataclasses import replace

    gen = torch_generator(seed, "attack-data", shard.client_id)
    vocab = int(shard.train.max()) + 1
    return replace(shard, train=torch.randint(0, vocab, shard.train.shape, generator=gen))

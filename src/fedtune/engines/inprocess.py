"""The default engine: one process, the base model loaded once, clients run in turn with their
adapters swapped in and out. Every client runs `run_client` (the same as on Flower); payloads
are really encoded and decoded, so bytes are measured. Client state lives in a `ClientStateStore`
under the run directory."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.adapters import adapter_of
from fedtune.client.run import ClientJob, ClientPlan, ClientReply, ClientState, advertise, model_private, run_client
from fedtune.client.store import ClientStateStore
from fedtune.client.train import model_device
from fedtune.codecs import serialize
from fedtune.config import ExperimentConfig
from fedtune.config.schema import EvalConfig
from fedtune.data.blocks import Shard, pooled
from fedtune.data.chat import PromptSet
from fedtune.data.report import SOURCE_FACTS
from fedtune.engines.capabilities import INPROCESS, Engine
from fedtune.engines.faults import FaultInjection, Faults, PoisonedShards, attackers
from fedtune.engines.federation import (
    Federation,
    build_adapted_model,
    device_facts,
    load_shards,
    rank_per_client,
    resolve_auto,
    run_precision,
    variants_per_client,
)
from fedtune.engines.plan import build_plan
from fedtune.errors import ConfigError
from fedtune.evaluation.metrics import evaluate_blocks, evaluate_split
from fedtune.models.adapters import get_state, lora_scale, set_state_
from fedtune.models.load import load_tokenizer, resolve_model_dir
from fedtune.types import AdapterState, ClientFailure

if TYPE_CHECKING:
    from fedtune.engines.parties import Parties
    from fedtune.strategies.trust_distill import TrustDistill

StepCallback = Callable[[str, int, int, float], None]


class InProcessEngine:
    """Runs client rounds sequentially on one shared model; also the clients' side of peer
    scoring (PCL) and the server's reference set (Bristle), which need the clients' data."""

    capabilities = INPROCESS

    def __init__(
        self,
        model: Any,
        shards: Mapping[str, Shard],
        plan: ClientPlan,
        store: ClientStateStore,
        *,
        eval_shards: Mapping[str, Shard] | None = None,
        evaluation: EvalConfig | None = None,
        tokenizer: Any = None,
    ):
        self.model = model
        self.shards = shards  # training data per trainer (the pooled shard for 'centralized')
        self.eval_shards = eval_shards if eval_shards is not None else shards
        self.plan = plan
        self.store = store
        self.evaluation = evaluation or EvalConfig()
        self.eval_batch_size = self.evaluation.batch_size
        self.tokenizer = tokenizer  # decodes generations (instruction data)
        self.peers = self

    def run(self, jobs: Sequence[ClientJob], on_step: StepCallback | None = None) -> list[ClientReply | ClientFailure]:
        secure = self.plan.secure_aggregation
        if secure and len(jobs) == 1:  # a sum of one is that client's update: it never trains or uploads
            reason = "secure aggregation needs 2 participants: 1 this round (its masked upload would be its update)"
            return [ClientFailure(jobs[0].client_id, reason, len(jobs[0].payload))]  # sent, as a dropout's
        keyed: dict[str, ClientState] = {}  # the round's key pairs: in memory only, never in the store
        if secure:  # the key-advertising step: public keys go through the server to every participant
            keys = {}
            for job in jobs:
                keys[job.client_id], keyed[job.client_id] = advertise(
                    job, self.plan, self.store.get(job.client_id, before=job.round)
                )
            jobs = [replace(j, peer_keys=keys) for j in jobs]
        replies: list[ClientReply | ClientFailure] = []
        for job in jobs:
            cid = job.client_id
            cb = (lambda s, n, loss, cid=cid: on_step(cid, s, n, loss)) if on_step else None
            state = keyed.pop(cid) if secure else self.store.get(cid, before=job.round)
            reply, state = run_client(job, self.model, self.shards[cid], self.plan, state, cb)
            self.store.put(cid, replace(state, secagg_key=b""), job.round)
            replies.append(reply)
        return replies

    def private_of(self, cid: str) -> AdapterState:
        return self.store.get(cid).private

    def parties(self, cfg: ExperimentConfig, strategy: TrustDistill, model_dir: str, tokenizer: Any) -> Parties:
        """Every party's own model in this process, over this engine's shards (trust_distill)."""
        from fedtune.engines.parties import local_parties

        return local_parties(cfg, strategy, self, model_dir, tokenizer)

    def _load(self, cid: str, state: AdapterState) -> None:
        """Client cid's model: the state it was sent plus what it keeps privately."""
        adapter_of(self.model).use_client_(self.model, self.plan.variants.get(cid))
        set_state_(self.model, {**model_private(self.private_of(cid)), **state})

    def evaluate(self, states: Mapping[str, AdapterState], split: str = "test") -> dict[str, dict[str, Any]]:
        """Each client's metrics on its own `split` ('test', 'val'; 'ood' = the mixture of every
        client's test data, class-balanced for classification) under the state given for it (plus
        its private state): loss / ppl, and on instruction data accuracy and generation scores."""
        out: dict[str, dict[str, Any]] = {}
        shared: dict[int, dict[str, Any]] = {}  # OOD data is the same for all: score a shared model once
        for cid, state in states.items():
            alone = not model_private(self.private_of(cid)) and cid not in self.plan.variants
            if split == "ood" and alone and id(state) in shared:
                out[cid] = dict(shared[id(state)])
                continue
            blocks, mask, prompts = self.ood_split() if split == "ood" else self._split(cid, split)
            if blocks.shape[0] == 0:  # nothing to score (e.g. no validation blocks)
                continue
            self._load(cid, state)
            out[cid] = evaluate_split(
                self.model, blocks, mask, prompts, self.tokenizer, self.evaluation, self.plan.spec.bf16
            )
            if split == "ood" and alone:
                shared[id(state)] = out[cid]
        return out

    def _split(self, cid: str, split: str) -> tuple[torch.Tensor, torch.Tensor | None, PromptSet | None]:
        s = self.eval_shards[cid]
        return {"train": s.train, "val": s.val, "test": s.test}[split], s.mask(split), s.prompts.get(split)

    def ood_split(self) -> tuple[torch.Tensor, torch.Tensor | None, PromptSet | None]:
        """Out-of-distribution test set: the same number of test examples from every client (and
        for classification, the same number of prompts of every class)."""
        shards = list(self.eval_shards.values())
        n = min(int(s.test.shape[0]) for s in shards)
        masks = [s.test_mask[:n] for s in shards if s.test_mask is not None]
        prompts = [s.prompts["test"] for s in shards if "test" in s.prompts]
        return (
            torch.cat([s.test[:n] for s in shards]),
            torch.cat(masks) if len(masks) == len(shards) else None,
            PromptSet.concat(prompts).balanced() if prompts else None,
        )

    def reference_blocks(self, per_client: int) -> torch.Tensor:
        """A shared reference set: the first `per_client` validation blocks of every client
        (contributed with consent, as PCL's reference set is built from each domain's data)."""
        return torch.cat([self._reference(cid, per_client)[0] for cid in self.eval_shards])

    def _reference(self, cid: str, per_client: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        split = "val" if self.eval_shards[cid].val.shape[0] > 0 else "train"
        blocks, mask, _ = self._split(cid, split)
        return blocks[:per_client], mask[:per_client] if mask is not None else None

    def reference_losses(self, states: Mapping[str, AdapterState], per_client: int) -> dict[str, dict[str, float]]:
        """The server's scoring of candidate models on its trusted reference set (the first
        `per_client` validation blocks each client contributes), per contributing client:
        {candidate: {client: loss}}."""
        out: dict[str, dict[str, float]] = {}
        for name, state in states.items():
            set_state_(self.model, state)
            out[name] = {}
            for cid in self.eval_shards:
                blocks, mask = self._reference(cid, per_client)
                out[name][cid] = evaluate_blocks(self.model, blocks, self.eval_batch_size, self.plan.spec.bf16, mask)[
                    "loss"
                ]
        return out

    def peer_evaluate(
        self, states: Mapping[str, AdapterState], split: str = "val", max_blocks: int | None = None
    ) -> dict[str, dict[str, float]]:
        """On each client i, the loss of every peer model j on i's own `split` (PCL's validation
        trust): {i: {j: loss}}. Client i evaluates with j's shared state (its private part stays
        with j). The peers' states travel to i: the caller counts those bytes."""
        out: dict[str, dict[str, float]] = {}
        for j, state in states.items():
            self._load(j, state)
            for i in states:
                blocks, mask, _ = self._split(i, split)
                if blocks.shape[0] == 0:
                    blocks, mask, _ = self._split(i, "train")
                    blocks, mask = (
                        blocks[: self.eval_batch_size],
                        mask[: self.eval_batch_size] if mask is not None else None,
                    )
                blocks, mask = blocks[:max_blocks], mask[:max_blocks] if mask is not None else None
                out.setdefault(i, {})[j] = evaluate_blocks(
                    self.model, blocks, self.eval_batch_size, self.plan.spec.bf16, mask
                )["loss"]
        return out

    def receiver_losses(
        self, wanted: Mapping[str, Mapping[str, AdapterState]], max_blocks: int | None = None
    ) -> dict[str, dict[str, float]]:
        """Each receiver's scoring, on its own validation split (its training split's first
        batch when it has none), of the models it holds ({receiver: {name: model}}): the loss
        of each, {receiver: {name: loss}} (a peer's local computation: nothing travels)."""
        out: dict[str, dict[str, float]] = {}
        for j, models in wanted.items():
            blocks, mask, _ = self._split(j, "val")
            if blocks.shape[0] == 0:
                blocks, mask, _ = self._split(j, "train")
                blocks, mask = (
                    blocks[: self.eval_batch_size],
                    mask[: self.eval_batch_size] if mask is not None else None,
                )
            blocks, mask = blocks[:max_blocks], mask[:max_blocks] if mask is not None else None
            for name, state in models.items():
                self._load(j, state)
                out.setdefault(j, {})[name] = evaluate_blocks(
                    self.model, blocks, self.eval_batch_size, self.plan.spec.bf16, mask
                )["loss"]
        return out

    @torch.no_grad()
    def reference_logits(self, states: Mapping[str, AdapterState], blocks: torch.Tensor, k: int) -> dict[str, Any]:
        """Each client's model's top-k logits on a shared reference set (PCL's prediction
        trust): {client: (values [N, T, k], indices [N, T, k])}, computed on the client."""
        out = {}
        dev = model_device(self.model)
        for cid, state in states.items():
            self._load(cid, state)
            vals, idx = [], []
            for i in range(0, int(blocks.shape[0]), self.eval_batch_size):
                logits = self.model(input_ids=blocks[i : i + self.eval_batch_size].to(dev)).logits.float()
                top = logits.topk(k, dim=-1)
                vals.append(top.values.cpu())  # the server's side (PCL's distances) works on host tensors
                idx.append(top.indices.cpu())
            out[cid] = (torch.cat(vals), torch.cat(idx))
        return out


def inprocess_federation(cfg: ExperimentConfig) -> Federation:
    """All clients in this process (data loaded and checked before any model weights load)."""
    from fedtune import components

    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    limits = components.model_limit_problems(cfg, model_dir)
    if limits:
        raise ConfigError(limits)
    tokenizer = load_tokenizer(model_dir)
    shards, data = load_shards(cfg, tokenizer)
    source = {k: data.pop(k) for k in SOURCE_FACTS if k in data}  # console only (Federation.source_facts)
    ids = list(shards)
    cfg, auto = resolve_auto(cfg, ids, model_dir)  # adapter.auto: ranks and upload codecs per client
    ranks = rank_per_client(cfg, ids)
    variants_per_client(cfg, ids)  # the lists' lengths are checked before the model loads
    cfg, precision, slow = run_precision(cfg)  # 'auto' dtype / bf16 for this device
    model, adapter_cfg = build_adapted_model(cfg, model_dir, ranks, tokenizer, shards)
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    strategy = components.build_strategy(cfg, components.run_context(cfg, ids, lora_scale(model), hidden))
    caps = strategy.capabilities
    plan = build_plan(cfg, strategy, get_state(model), ids)
    if caps.pools_data and cfg.train.epochs is None:  # the pooled client trains as long as k clients would
        k = components.run_context(cfg, ids, 1.0).sample_size
        plan = replace(plan, spec=replace(plan.spec, steps=plan.spec.steps * k))
    bad = attackers(ids, cfg.attack.fraction, cfg.seed) if cfg.attack.kind != "none" else frozenset()
    train: Mapping[str, Shard] = shards
    if caps.pools_data:
        train = {"pooled": pooled(shards)}
    elif cfg.attack.kind == "data":
        train = PoisonedShards(shards, bad, cfg.seed)
    warmup = _warm_up(model, torch.zeros((1, cfg.data.block_size), dtype=torch.long))  # builds no shard
    store = ClientStateStore(Path(cfg.run_dir()) / "clients", plan.initial_state())
    engine: Engine = InProcessEngine(
        model, train, plan, store, eval_shards=shards, evaluation=cfg.evaluation, tokenizer=tokenizer
    )
    s = cfg.sampling
    faults = Faults(s.dropout, s.straggler_fraction, s.straggler_slowdown, s.deadline)
    if faults.dropout > 0 or faults.timed:
        engine = FaultInjection(engine, faults, cfg.seed)
    collected = _data_bytes(shards) if caps.pools_data else 0
    facts = device_facts(model, precision, slow)
    round0 = {**data, **facts, **auto, "warmup_seconds": warmup, **({"attackers": sorted(bad)} if bad else {})}
    return Federation(ids, model, model_dir, adapter_cfg, strategy, engine, collected, round0, store, source)


def with_store(engine: Engine, store: ClientStateStore) -> Engine:
    """The same in-process engine (under its injected faults, if any) with its clients' states in
    `store` (a peer's own disk): a new engine, nothing set on the old one."""
    if isinstance(engine, FaultInjection):
        return FaultInjection(with_store(engine.engine, store), engine.faults, engine.seed)
    if not isinstance(engine, InProcessEngine):
        raise TypeError(f"with_store takes an in-process engine, not {type(engine).__name__}")
    return InProcessEngine(
        engine.model,
        engine.shards,
        engine.plan,
        store,
        eval_shards=engine.eval_shards,
        evaluation=engine.evaluation,
        tokenizer=engine.tokenizer,
    )


def _warm_up(model: Any, block: torch.Tensor) -> float:
    """One forward pass before any timed work (first-call allocations and kernel selection), so
    the first client's train seconds are not its warm-up; returns its seconds (reported in round 0)."""
    import time

    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        model(input_ids=block.to(model_device(model)))
    return time.perf_counter() - t0


def _data_bytes(shards: Mapping[str, Shard]) -> int:
    """Bytes of raw training tokens the centralized baseline must collect (int32 on the wire)."""
    return sum(len(serialize({"tokens": s.train.to(torch.int32)})) for s in shards.values())

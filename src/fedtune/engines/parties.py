"""Parties that each hold their own model (trust_distill, arXiv:2305.18497): the model built in
code from a base (its first k decoder layers, or its weights re-drawn: a bad model) with the
run's adapter on top, its predictions on the public corpus, and its local step (own data loss
plus the distillation loss on its pseudo-labels)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedtune.adapters import build_adapter
from fedtune.adapters.base import InjectContext
from fedtune.client.packing import PACKABLE_MODEL_TYPES
from fedtune.client.train import TrainSpec, autocast, batch_indices, lm_loss, make_optimizer, model_device
from fedtune.config import ExperimentConfig
from fedtune.data.blocks import Shard, pack
from fedtune.data.sources import load_corpus
from fedtune.engines.federation import run_precision
from fedtune.errors import ConfigError, Problem
from fedtune.evaluation.metrics import evaluate_split, record_fields
from fedtune.models.adapters import get_state, set_state_
from fedtune.models.load import load_model, model_type, resolve_device, resolve_model_dir
from fedtune.seeding import derive_seed, torch_generator
from fedtune.strategies.trust_distill import (
    Party,
    Predictions,
    TrustDistill,
    decode_predictions,
    distill_loss,
    encode_predictions,
    top_k_probs,
)
from fedtune.types import AdapterState

if TYPE_CHECKING:
    from fedtune.engines.inprocess import InProcessEngine


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks (Llama-style `model.layers`, GPT-2's `transformer.h`)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError([Problem("strategy.parties", type(model).__name__, "no decoder layer list found", "")])


def truncate_layers_(model: Any, k: int) -> None:
    """Keep the first k decoder layers (a depth-reduced variant, built in code)."""
    layers = decoder_layers(model)
    if k > len(layers):
        raise ConfigError(
            [Problem("strategy.parties.layers", k, f"the model has only {len(layers)} layers", "use fewer layers")]
        )
    del layers[k:]
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, key):
            setattr(model.config, key, k)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:k]


def reinit_(model: Any, seed: int) -> None:
    """A broken model: every weight matrix re-drawn N(0, 1), norms and biases kept. Not a fresh
    Hugging Face init (std 0.02), which for the tiny models is as good as their base: random too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g))


def build_party_model(cfg: ExperimentConfig, base_dir: str, party: Party, cid: str) -> Any:
    """A party's own model with the run's adapter (seeded per run, like every adapter init)."""
    mcfg = cfg.model if party.model is None else cfg.model.model_copy(update={"name": party.model})
    model_dir = base_dir if party.model is None else resolve_model_dir(mcfg, cfg.seed)
    model = load_model(model_dir, mcfg)
    if party.layers is not None:
        truncate_layers_(model, party.layers)
    if party.init == "random":
        reinit_(model, derive_seed(cfg.seed, "party-init", cid))
    kind = model_type(model_dir)
    if cfg.train.packing and kind not in PACKABLE_MODEL_TYPES:
        why = f"party {cid!r}'s model type {kind!r} is not one whose packed attention mask fedtune checks"
        raise ConfigError([Problem("train.packing", True, why, "set train.packing: false")])
    ctx = InjectContext(seed=derive_seed(cfg.seed, "adapter-init"), model_type=kind, train_lr=cfg.train.lr)
    model = build_adapter(cfg.adapter).inject(model, ctx)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model.to(resolve_device(cfg.model.device))


def public_corpus(cfg: ExperimentConfig, tokenizer: Any, source: str, n: int, labels: list[str] | None) -> torch.Tensor:
    """n blocks [n, block_size] of a built-in public source (never the clients' data), read with
    the source's defaults (the clients' cuts and filters are theirs)."""
    from fedtune.config.inputs import DataConfig

    data = DataConfig(source=source, labels=labels, block_size=cfg.data.block_size)
    public = load_corpus(data)
    return pack([str(t) for t in public["text"][: 4 * n]], tokenizer, cfg.data.block_size)[:n]


@torch.no_grad()
def predict(model: Any, blocks: torch.Tensor, k: int, batch_size: int, bf16: bool) -> Predictions:
    """The model's top-k next-token probabilities at every position of `blocks`: [N * T, k]."""
    model.eval()
    dev = model_device(model)
    vals, idx = [], []
    for s in range(0, int(blocks.shape[0]), batch_size):
        with autocast(bf16, dev, model):
            logits = model(input_ids=blocks[s : s + batch_size].to(dev)).logits
        v, i = top_k_probs(logits, k)
        vals.append(v.cpu())  # what travels is on the host
        idx.append(i.cpu())
    return torch.cat(vals), torch.cat(idx)


def rows(target: Predictions, block_ids: torch.Tensor, t: int) -> Predictions:
    """The target's positions of the blocks `block_ids` (T = t positions per block)."""
    pos = (block_ids[:, None] * t + torch.arange(t)[None]).reshape(-1)
    return target[0][pos], target[1][pos]


def cycle(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield from batch_indices(n, batch_size, gen)


def train_party_(
    model: Any,
    shard: Shard,
    public: torch.Tensor,
    target: Predictions | None,
    spec: TrainSpec,
    weight: float,
    gen: torch.Generator,
) -> dict[str, float]:
    """`spec.steps` steps of own-data loss + weight * KL(pseudo-label || model) on public blocks
    (no distillation when `target` is None: the warm-up). Returns the mean losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, spec)
    dev = model_device(model)
    own = cycle(int(shard.train.shape[0]), spec.batch_size, gen)
    pub = cycle(int(public.shape[0]), spec.batch_size, gen)
    mask = shard.mask("train")
    sums = {"train_loss": 0.0, "distill_loss": 0.0}
    model.train()
    for _ in range(spec.steps):
        b = next(own)
        loss = lm_loss(model, shard.train[b], spec.bf16, mask=mask[b] if mask is not None else None, pack=spec.packing)
        sums["train_loss"] += float(loss.detach())
        if target is not None:
            p = next(pub)
            with autocast(spec.bf16, dev, model):
                logits = model(input_ids=public[p].to(dev)).logits
            kl = distill_loss(logits, rows(target, p, int(public.shape[1])))
            sums["distill_loss"] += float(kl.detach())
            loss = loss + weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        opt.step()
    model.eval()
    out = {k: v / max(1, spec.steps) for k, v in sums.items()}
    return out if target is not None else {"train_loss": out["train_loss"]}


def party_generator(seed: int, rnd: int, cid: str) -> torch.Generator:
    return torch_generator(seed, "distill-batches", rnd, cid)


@dataclass(frozen=True)
class PartyWork:
    """What a party does with its own model, wherever it lives: the same code in this process
    and on a party's SuperNode, so both give the same numbers."""

    cfg: ExperimentConfig
    strategy: TrustDistill
    spec: TrainSpec
    public: torch.Tensor
    tokenizer: Any  # generation metrics on instruction data

    def predictions(self, model: Any) -> bytes:
        """The payload a party sends up: its encoded top-k predictions on the public corpus."""
        s, ev = self.strategy, self.cfg.evaluation
        return encode_predictions(predict(model, self.public, s.top_k, ev.batch_size, self.spec.bf16), s.values)

    def train_(self, model: Any, shard: Shard, label: bytes | None, rnd: int, cid: str) -> dict[str, float]:
        """The round's local step, distilling from the pseudo-label payload it received (None:
        warm-up, or no label this round)."""
        target = None if label is None else decode_predictions(label)
        gen = party_generator(self.cfg.seed, rnd, cid)
        return train_party_(model, shard, self.public, target, self.spec, self.strategy.weight, gen)

    def evaluate(self, model: Any, shard: Shard) -> dict[str, float]:
        """The party's own model on its own test (and validation) split: loss / ppl, and on
        instruction data accuracy, macro-F1 and generation scores, as the federated loop's records."""
        out: dict[str, float] = {}
        for split in ("test", "val") if self.cfg.evaluation.val else ("test",):
            blocks = getattr(shard, split)
            if blocks.shape[0] > 0:
                out.update(self.evaluate_on(model, (blocks, shard.mask(split), shard.prompts.get(split)), split))
        return out

    def evaluate_on(self, model: Any, data: tuple[Any, Any, Any], prefix: str) -> dict[str, float]:
        """The model on (blocks, mask, prompts) as record fields named `prefix`: a split of the
        party's own, or the pooled OOD mixture."""
        r = evaluate_split(model, data[0], data[1], data[2], self.tokenizer, self.cfg.evaluation, self.spec.bf16)
        return record_fields(prefix, r, tokens=True, sample=False)  # generated text stays on the party


def party_work(cfg: ExperimentConfig, strategy: TrustDistill, tokenizer: Any) -> PartyWork:
    from fedtune import components

    public = public_corpus(cfg, tokenizer, strategy.public, strategy.public_blocks, strategy.public_labels)
    return PartyWork(cfg, strategy, components.build_train_spec(cfg), public, tokenizer)


class Parties(Protocol):
    """Where the parties' own models live and work (trust_distill). Predictions go up and
    pseudo-labels come down as encoded payloads; a party's model never leaves it. A party that
    does not answer is a failure (its reason, a string) for that step.

    predict: each party's predictions payload for round rnd (its model after round rnd - 1).
    train: round rnd's local step; `labels` holds the pseudo-label payloads (a party without one
        trains on its own data only). Returns its losses, or the failure.
    evaluate: each party's own model after round rnd on its own splits.
    saved / restore_: the checkpoint's part (empty where every party keeps its own versions).
    public_positions: token positions of the public corpus each party predicts on.
    """

    public_positions: int

    def predict(self, rnd: int) -> dict[str, bytes | str]: ...

    def train(self, rnd: int, labels: Mapping[str, bytes]) -> dict[str, dict[str, float] | str]: ...

    def evaluate(self, rnd: int) -> dict[str, dict[str, float]]: ...

    def saved(self) -> dict[str, AdapterState]: ...

    def restore_(self, saved: Mapping[str, AdapterState]) -> None: ...


class LocalParties:
    """Every party's model in this process (the in-process engine); `ood` is the pooled test
    mixture each party is also scored on (evaluation.ood), or None."""

    def __init__(
        self,
        work: PartyWork,
        models: Mapping[str, Any],
        shards: Mapping[str, Shard],
        eval_shards: Mapping[str, Shard],
        ood: Any = None,
    ):
        self.work = work
        self.models = dict(models)
        self.shards = shards
        self.eval_shards = eval_shards
        self.ood = ood
        self.public_positions = int(work.public.numel())

    def predict(self, rnd: int) -> dict[str, bytes | str]:
        return {c: self.work.predictions(m) for c, m in self.models.items()}

    def train(self, rnd: int, labels: Mapping[str, bytes]) -> dict[str, dict[str, float] | str]:
        return {c: self.work.train_(m, self.shards[c], labels.get(c), rnd, c) for c, m in self.models.items()}

    def evaluate(self, rnd: int) -> dict[str, dict[str, float]]:
        out = {c: self.work.evaluate(m, self.eval_shards[c]) for c, m in self.models.items()}
        if self.ood is not None:  # each party's own model on the mixture (evaluation.ood)
            for c, m in self.models.items():
                out[c].update(self.work.evaluate_on(m, self.ood, "ood"))
        return out

    def saved(self) -> dict[str, AdapterState]:
        return {c: get_state(m) for c, m in self.models.items()}

    def restore_(self, saved: Mapping[str, AdapterState]) -> None:
        for c, m in self.models.items():
            set_state_(m, saved[c])


def local_parties(
    cfg: ExperimentConfig, strategy: TrustDistill, engine: InProcessEngine, model_dir: str, tokenizer: Any
) -> LocalParties:
    """The in-process engine's parties: each its own model (`strategy.party(n)`) over the
    engine's shards, in the precision this process's device runs ('auto' resolved, as the
    engine's own model)."""
    cfg, _, _ = run_precision(cfg)
    ids = list(engine.eval_shards)
    models = {c: build_party_model(cfg, model_dir, strategy.party(n), c) for n, c in enumerate(ids)}
    ood = engine.ood_split() if cfg.evaluation.ood else None
    return LocalParties(party_work(cfg, strategy, tokenizer), models, engine.shards, engine.eval_shards, ood)

"""Trust-weighted collaborative distillation (Fan, Mendler-Dünner, Jaggi, "Collaborative Learning
via Prediction Consensus", NeurIPS 2023, arXiv:2305.18497): every party keeps its own model (any
architecture over one tokenizer), the collective pseudo-labels a public unlabeled corpus with a
trust-weighted mix of the parties' next-token predictions, and each party distils from its
pseudo-labels on top of its own data loss. Only top-k predictions cross the network.

The trust rule. The paper's text was not retrievable here beyond its abstract; the rule below is
the authors' released code (github.com/fan1dy/collaboration-consensus, `client.py`, the default
`sim_measure='cosine'`, `cmode='regularized'`, `trust_update='dynamic'`), re-derived, not copied:
party i's trust in party j this round is

    s_ij = mean_x  cos(p_j(x), p_i(x)) / (1 + H(p_i(x))),     W_ij = s_ij / sum_l s_il,

with p(x) a party's predicted distribution at position x of the public corpus and H its entropy
(a party unsure of its own prediction spreads its trust); the pseudo-label of party i is
y_i(x) = L1-normalised sum_j W_ij p_j(x). Recomputed every round from the current predictions
(dynamic trust), the weights and labels move together until the parties agree: the round record's
`consensus_gap` (mean total variation between the parties' pseudo-labels) measures how far from
consensus they are. A bad model disagrees with the others, so every other row gives it little weight.
Choices of ours (language models, not classifiers): p(x) is a party's top-k next-token
probabilities (the rest of the vocabulary is zero), the mixed label keeps its top k renormalised,
and the distillation loss is KL(y_i || p_i) on those k tokens, weighted by `weight` (the code's
lambda, 0.5). Tokenizers must match (probabilities are mixed token by token); mixes are refused
by name at load time (`tokenizer_problems`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedtune.codecs import deserialize, serialize
from fedtune.errors import Problem
from fedtune.strategies.base import STRATEGIES, Aggregate, Capabilities, PeerScoring, StrategyBase
from fedtune.strategies.params import Count, NonNegative, NonNegativeCount
from fedtune.types import AdapterState, ClientUpdate

Predictions = tuple[torch.Tensor, torch.Tensor]  # (probabilities [P, k] float, token ids [P, k] int64)
PARTY_KEYS = {"model", "layers", "init"}
PRIVATE_SOURCES = {"files"}  # a user's own files may be client data: never the public corpus


# -- predictions on the wire -----------------------------------------------------------------------


def top_k_probs(logits: torch.Tensor, k: int) -> Predictions:
    """logits [..., V] -> the k most likely tokens' probabilities and ids, flattened to [P, k]."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(k, dim=-1)
    return top.values.reshape(-1, k), top.indices.reshape(-1, k)


def encode_predictions(pred: Predictions, values: Literal["fp16", "uint8"] = "fp16") -> bytes:
    """The payload a party sends: ids as uint16 when every id fits (vocabularies up to 65,536
    tokens: SmolLM2's 49,152, Llama 2's 32,000), else int32; probabilities as fp16 or uint8
    (round(255 p), probabilities lie in [0, 1], so the step is 1/255)."""
    v, i = pred
    q = v.half() if values == "fp16" else (v.clamp(0, 1) * 255).round().to(torch.uint8)
    ids = i.to(torch.uint16) if i.numel() == 0 or int(i.max()) < 2**16 else i.to(torch.int32)
    return serialize({"i": ids, "v": q})


def decode_predictions(payload: bytes) -> Predictions:
    t = deserialize(payload)
    v = t["v"].float() / 255 if t["v"].dtype == torch.uint8 else t["v"].float()
    return v, t["i"].long()


# -- trust and pseudo-labels (pure) ------------------------------------------------------------------


def sparse_dot(a: Predictions, b: Predictions) -> torch.Tensor:
    """Per position, the dot product of two sparse distributions given as top-k lists: [P]."""
    same = a[1][:, :, None] == b[1][:, None, :]  # [P, k, k]
    return (same * a[0][:, :, None] * b[0][:, None, :]).sum(dim=(1, 2))


def entropy(pred: Predictions) -> torch.Tensor:
    """Per position, the entropy (nats) of the kept probabilities: [P]."""
    v = pred[0].clamp_min(1e-12)
    return -(v * v.log()).sum(dim=1)


def similarity(other: Predictions, own: Predictions) -> float:
    """How much a party (`own`) trusts `other`: mean over positions of cos(other, own) divided by
    1 + the entropy of its own prediction (the released code's 'regularized' cosine)."""
    cos = sparse_dot(other, own) / (sparse_dot(other, other).sqrt() * sparse_dot(own, own).sqrt()).clamp_min(1e-8)
    return float((cos / (1.0 + entropy(own))).mean())


def trust_matrix(preds: Sequence[Predictions]) -> torch.Tensor:
    """W [n, n], row i = party i's trust in each party (itself included), rows summing to 1."""
    s = torch.tensor([[similarity(preds[j], preds[i]) for j in range(len(preds))] for i in range(len(preds))])
    return (s / s.sum(dim=1, keepdim=True).clamp_min(1e-12)).double()


def mix(weights: Sequence[float], preds: Sequence[Predictions], k: int, vocab: int, chunk: int = 256) -> Predictions:
    """The pseudo-label sum_j w_j p_j (L1-normalised), kept to its top k renormalised: [P, k]."""
    n_pos = preds[0][0].shape[0]
    vals, idx = [], []
    for s in range(0, n_pos, chunk):  # dense over the vocabulary a chunk of positions at a time
        dense = torch.zeros(min(chunk, n_pos - s), vocab, dtype=torch.float64)
        for w, (v, i) in zip(weights, preds):
            dense.scatter_add_(1, i[s : s + chunk], w * v[s : s + chunk].double())
        dense = dense / dense.sum(dim=1, keepdim=True).clamp_min(1e-12)
        top = dense.topk(k, dim=1)
        vals.append((top.values / top.values.sum(dim=1, keepdim=True).clamp_min(1e-12)).float())
        idx.append(top.indices)
    return torch.cat(vals), torch.cat(idx)


def total_variation(a: Predictions, b: Predictions) -> float:
    """Mean over positions of the total variation distance of two sparse distributions."""
    overlap = torch.minimum(a[0][:, :, None], b[0][:, None, :]) * (a[1][:, :, None] == b[1][:, None, :])
    mass = 0.5 * (a[0].sum(dim=1) + b[0].sum(dim=1))
    return float((mass - overlap.sum(dim=(1, 2))).mean())


def consensus_gap(labels: Sequence[Predictions]) -> float:
    """Mean pairwise total variation between the parties' pseudo-labels (0: consensus)."""
    n = len(labels)
    pairs = [total_variation(labels[i], labels[j]) for i in range(n) for j in range(i + 1, n)]
    return sum(pairs) / len(pairs) if pairs else 0.0


def distill_loss(logits: torch.Tensor, target: Predictions) -> torch.Tensor:
    """KL(target || model) on the target's k tokens, mean over positions; logits [B, T, V] and a
    target of B * T positions."""
    logp = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])  # [P, V]
    v, i = target[0].to(logp.device), target[1].to(logp.device)
    return (v * (v.clamp_min(1e-12).log() - logp.gather(1, i))).sum(dim=1).mean()


# -- the parties ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Party:
    """A party's own model: `model` (None: the run's model.name), its first `layers` decoder layers
    (None: all), and `init` 'pretrained' or 'random' (weights re-drawn: a bad model)."""

    model: str | None = None
    layers: int | None = None
    init: Literal["pretrained", "random"] = "pretrained"


def tokenizer_name(model: str) -> str:
    """The tokenizer a model name implies (compared by name before anything loads)."""
    return {"tiny": "fedtune byte-level (tiny)", "smollm2": "SmolLM2 (smollm2)"}.get(model, model)


def party_problems(parties: Any) -> list[Problem]:
    """Each party entry must be a mapping of known keys with valid values."""
    if parties is None:
        return []
    if not isinstance(parties, list):
        return [Problem("strategy.parties", parties, "must be a list, one entry per client", "e.g. [{layers: 2}, {}]")]
    out = []
    for n, p in enumerate(parties):
        where = f"strategy.parties[{n}]"
        bad = set(p) - PARTY_KEYS if isinstance(p, dict) else {"(not a mapping)"}
        if bad:
            out.append(Problem(where, p, f"unknown keys {sorted(bad)}", f"use only {sorted(PARTY_KEYS)}"))
            continue
        if p.get("layers") is not None and (not isinstance(p["layers"], int) or p["layers"] < 1):
            out.append(Problem(f"{where}.layers", p["layers"], "must be a positive integer", "e.g. layers: 2"))
        if p.get("init", "pretrained") not in ("pretrained", "random"):
            out.append(Problem(f"{where}.init", p["init"], "must be 'pretrained' or 'random'", "init: pretrained"))
    return out


def tokenizer_problems(base_model: str, parties: Sequence[Mapping[str, Any]] | None) -> list[Problem]:
    """Parties whose models use different tokenizers cannot mix next-token probabilities."""
    names = [tokenizer_name(str(p.get("model") or base_model)) for p in parties or []]
    if len(set(names)) <= 1:
        return []
    groups = {t: [n for n, x in enumerate(names) if x == t] for t in dict.fromkeys(names)}
    said = "; ".join(f"{t} (parties {g})" for t, g in groups.items())
    return [
        Problem(
            "strategy.parties",
            [p.get("model") or base_model for p in parties or []],
            f"trust_distill mixes next-token probabilities token by token, so every party needs the same "
            f"tokenizer, but these differ: {said}",
            "give every party a model with one tokenizer (depth-reduced variants: layers: k), or run the "
            "groups as separate federations",
        )
    ]


@STRATEGIES.register("trust_distill")
@dataclass(frozen=True)
class TrustDistill(StrategyBase):
    """Trust-weighted collaborative distillation (arXiv:2305.18497): the loop is
    `recipes/distill.py` (each party's own model); this class holds the hyperparameters.

    Attributes:
        public: the built-in data source pseudo-labelled by the collective (never client data).
        public_labels: keep only these labels of the public source (None: all).
        public_blocks: blocks of the public corpus (data.block_size tokens each).
        top_k: next-token probabilities each party sends per position.
        values: how the probabilities travel: 'fp16' or 'uint8'.
        weight: the distillation loss's weight beside the party's own data loss.
        warmup_rounds: rounds of local training before the first exchange.
        parties: one entry per client (Party's fields); None: every party the run's model.
    """

    public: str = "stdlib-docstrings"
    public_labels: list[str] | None = None
    public_blocks: Count = 8
    top_k: Count = 20
    values: Literal["fp16", "uint8"] = "fp16"
    weight: NonNegative = 0.5
    warmup_rounds: NonNegativeCount = 1
    parties: list[dict[str, Any]] | None = field(default=None)

    capabilities = Capabilities(has_global=False, personalized=True, own_models=True)

    def party(self, n: int) -> Party:
        """The n-th client's party spec."""
        p = (self.parties or [])[n] if self.parties and n < len(self.parties) else {}
        return Party(p.get("model"), p.get("layers"), p.get("init", "pretrained"))

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {}

    def configure(self, rnd: int, client_ids: Sequence[str], state: Any) -> Mapping[str, AdapterState]:
        raise NotImplementedError("trust_distill runs its own loop (recipes/distill.py)")

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: Any, peers: PeerScoring | None = None
    ) -> Aggregate:
        raise NotImplementedError("trust_distill runs its own loop (recipes/distill.py)")

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Any]:
        """`parties`, when given, has one entry per registered client."""
        if self.parties is None or len(self.parties) == len(client_ids):
            return []
        return [
            Problem(
                "strategy.parties",
                len(self.parties),
                f"one entry per client is needed, and there are {len(client_ids)} clients ({', '.join(client_ids)})",
                f"list {len(client_ids)} parties in client order ({{}} for the run's model as it is)",
            )
        ]

    @classmethod
    def run_problems(cls, base_model: str, data_source: str, params: dict[str, Any]) -> list[Problem]:
        """Checks against the rest of the config: one tokenizer across the parties, and a public
        corpus that is not the clients' own source."""
        parties = params.get("parties")
        out = (
            tokenizer_problems(base_model, parties) if isinstance(parties, list) and not party_problems(parties) else []
        )
        public = params.get("public", cls.public)
        if public == data_source:
            out.append(
                Problem(
                    "strategy.public",
                    public,
                    f"the public corpus is the clients' own data source ({data_source!r}); the pseudo-labelled "
                    "corpus is sent to every party and must not be client data",
                    "name another built-in source (fedtune ls)",
                )
            )
        return out

    @classmethod
    def config_problems(cls, params: dict[str, Any], adapter: Any, codec: Any, secure: bool) -> list[Any]:
        out = party_problems(params.get("parties"))
        public = params.get("public", cls.public)
        if public in PRIVATE_SOURCES:
            out.append(
                Problem(
                    "strategy.public",
                    public,
                    "the pseudo-labelled corpus is sent to every party, so it must be public, not a user's files",
                    "name a built-in source (fedtune ls), e.g. stdlib-docstrings",
                )
            )
        if secure:
            out.append(
                Problem("secure_aggregation", True, "trust_distill needs each party's predictions", "set it false")
            )
        return out

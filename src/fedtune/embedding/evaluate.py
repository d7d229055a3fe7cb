"""Retrieval scored in the loop: each party's test queries against its own test documents, and
the pooled test set (every party's pairs together, plus nearest-neighbour topic accuracy of the
pooled documents by their labels). The generation side stays measured: each party's model's plain
next-token loss on its test pairs (query then document tokens, cut to the embedded length), `lm_loss`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtune.embedding.gem import embed_ids, plain_ntp_loss
from fedtune.embedding.parties import Party
from fedtune.embedding.train import load_gem_state_
from fedtune.evaluation.retrieval import knn_accuracy, retrieval_metrics
from fedtune.types import AdapterState


def party_metrics(model: Any, tokens: torch.Tensor, party: Party, batch_size: int, bf16: bool) -> dict[str, float]:
    q = embed_ids(model, party.query_ids, tokens, batch_size, bf16)
    d = embed_ids(model, party.doc_ids, tokens, batch_size, bf16)
    out = retrieval_metrics(q, d)
    cap = max(len(r) for r in [*party.query_ids, *party.doc_ids])  # the text length the run embeds
    rows = [r for r in ((x + y)[:cap] for x, y in zip(party.query_ids, party.doc_ids)) if len(r) >= 2]
    with torch.no_grad():
        losses = [float(plain_ntp_loss(model, rows[i : i + batch_size], bf16)) for i in range(0, len(rows), batch_size)]
    out["lm_loss"] = sum(losses) / len(losses) if losses else float("nan")
    return out


def pooled_metrics(
    model: Any, tokens: torch.Tensor, parties: Sequence[Party], batch_size: int, bf16: bool, knn: bool
) -> dict[str, float]:
    queries = [x for p in parties for x in p.query_ids]
    docs = [x for p in parties for x in p.doc_ids]
    d = embed_ids(model, docs, tokens, batch_size, bf16)
    out = retrieval_metrics(embed_ids(model, queries, tokens, batch_size, bf16), d)
    if knn:
        out["knn_topic_acc"] = knn_accuracy(d, [lab for p in parties for lab in p.test.labels])
    return out


def evaluate_states(
    model: Any,
    tokens: torch.nn.Parameter,
    states: Mapping[str, AdapterState],
    parties: Mapping[str, Party],
    batch_size: int,
    bf16: bool,
    knn: bool,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per party: its model's retrieval on its own test pairs; pooled: the mean over the distinct
    models of their retrieval on the pooled test set (one model when there is a global one)."""
    per: dict[str, dict[str, float]] = {}
    pooled: list[dict[str, float]] = []
    seen: dict[int, dict[str, float]] = {}
    for cid, state in states.items():
        load_gem_state_(model, tokens, state)
        per[cid] = party_metrics(model, tokens, parties[cid], batch_size, bf16)
        if id(state) not in seen:
            seen[id(state)] = pooled_metrics(model, tokens, list(parties.values()), batch_size, bf16, knn)
            pooled.append(seen[id(state)])
    keys = pooled[0].keys() if pooled else []
    return per, {k: sum(p[k] for p in pooled) / len(pooled) for k in keys}

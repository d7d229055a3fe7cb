"""Retrieval and nearest-neighbour metrics on embeddings: pure functions of a similarity matrix.

Each query has exactly one relevant document (its pair), so with the gold document's 1-based
rank r: recall@k = [r <= k], reciprocal rank = 1 / r, and nDCG@10 = 1 / log2(r + 1) for r <= 10
(the ideal DCG of one relevant document is 1), else 0; each is averaged over the queries.
Ties count in the gold document's favour: r = 1 + #(documents scored strictly higher).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def cosine_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [Q, D] of query embeddings [Q, d] and document embeddings [D, d]."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    d = torch.nn.functional.normalize(docs.float(), dim=-1)
    return q @ d.T


def gold_ranks(scores: torch.Tensor, gold: Sequence[int]) -> torch.Tensor:
    """1-based rank of each query's gold document among all documents: scores [Q, D] -> [Q]."""
    g = torch.as_tensor(list(gold), dtype=torch.long)
    gold_score = scores.gather(1, g[:, None])  # [Q, 1]
    return 1 + (scores > gold_score).sum(dim=1)


def rank_metrics(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k for each k, MRR and nDCG@10 from the gold documents' ranks."""
    r = ranks.double()
    out = {f"recall@{k}": float((r <= k).double().mean()) for k in ks}
    out["mrr"] = float((1.0 / r).mean())
    gain = torch.where(r <= 10, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
    out["ndcg@10"] = float(gain.mean())
    return out


def retrieval_metrics(
    queries: torch.Tensor, docs: torch.Tensor, gold: Sequence[int] | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Cosine retrieval of `docs` [D, d] by `queries` [Q, d]; `gold[i]`: the document of query i
    (default: document i). Also reports the number of candidates (`retrieval_docs`)."""
    gold = list(range(int(queries.shape[0]))) if gold is None else list(gold)
    out = rank_metrics(gold_ranks(cosine_scores(queries, docs), gold), ks)
    out["retrieval_docs"] = float(docs.shape[0])
    return out


def knn_accuracy(embeddings: torch.Tensor, labels: Sequence[str]) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine): the share of items whose most similar
    other item has the same label (NaN for fewer than 2 items)."""
    n = int(embeddings.shape[0])
    if n < 2:
        return math.nan
    s = cosine_scores(embeddings, embeddings)
    s.fill_diagonal_(-math.inf)
    nearest: list[int] = s.argmax(dim=1).tolist()
    return sum(labels[i] == labels[j] for i, j in enumerate(nearest)) / n

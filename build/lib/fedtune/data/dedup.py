"""Near-duplicates never straddle splits: documents that share a 12-word shingle (a quoted reply,
a repeated signature, a copied paragraph) form one group, and whole groups go to train, validation
or test. Without it, 20 Newsgroups replies put 20-30 % of a client's test shingles verbatim in its
own training split."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SHINGLE = 12


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    """Hashes of the text's n-word windows (lowercased, whitespace-split)."""
    words = text.lower().split()
    return {hash(tuple(words[i : i + n])) for i in range(max(0, len(words) - n + 1))}


def groups(texts: Sequence[str], n: int = SHINGLE) -> list[int]:
    """A group id per document: documents sharing any shingle (transitively) share a group."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for d, text in enumerate(texts):
        for h in shingles(text, n):
            if h in owner:
                a, b = find(owner[h]), find(d)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[h] = d
    return [find(d) for d in range(len(texts))]


def overlap(train: Sequence[str], test: Sequence[str], n: int = SHINGLE) -> float:
    """Fraction of the test documents' shingles that appear in the training documents."""
    seen = set().union(*(shingles(t, n) for t in train)) if train else set()
    held = [h for t in test for h in shingles(t, n)]
    return sum(h in seen for h in held) / len(held) if held else 0.0


def split_order(
    n: int, val_fraction: float, test_fraction: float, gen: torch.Generator, group_of: Sequence[int] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, val, test): a seeded shuffle cut by the fractions (test and train never
    empty). With `group_of`, whole groups are placed: test and validation take shuffled groups that
    fit their share, everything else trains (a group too large for a share trains)."""
    order = torch.randperm(n, generator=gen).tolist()
    n_test = max(1, math.ceil(test_fraction * n))
    n_val = round(val_fraction * n) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        n_val = max(0, n - n_test - 1)
    if group_of is None:
        return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
    members: dict[int, list[int]] = {}
    for i in order:  # groups in the order their first member was shuffled to
        members.setdefault(group_of[i], []).append(i)
    test: list[int] = []
    val: list[int] = []
    train: list[int] = []
    for docs in members.values():
        if len(test) + len(docs) <= n_test:
            test += docs
        elif len(val) + len(docs) <= n_val:
            val += docs
        else:
            train += docs
    if not test:  # every group is larger than the test share: the smallest one tests
        smallest = min(members.values(), key=len)
        test, gone = smallest, set(smallest)
        train, val = [i for i in train if i not in gone], [i for i in val if i not in gone]
    if not train:  # cannot happen with >= 2 groups and n_val < n - n_test; kept for one-group corpora
        train, val = val, []
    return train, val, test

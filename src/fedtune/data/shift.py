"""A domain-shift task from 20 Newsgroups for parties without labels (FedMM, arXiv:2110.08477).

Labelled source parties 'source-<i>' each hold the posts of one or two topics (label skew); one
unlabelled party 'target' holds posts of all those topics, disjoint from the sources', shifted by
character noise: each letter is replaced by a uniformly random letter with probability `noise`.

Why this shift: the topics and the question are the same, so the answer a reader would give is
unchanged (the label function is shared: covariate shift, the assumption of adversarial domain
adaptation), and with 15 % of letters replaced a post stays readable; but the tokenizer cuts noisy
words into different, rarer sub-words, so the model's hidden states of target posts move away from
the sources' (the shift a discriminator can see and the adapter can learn to remove). It is
seeded and its strength is one number, so the benchmark can vary it. Every post is scored with
the same prompt and options, so target accuracy is comparable across methods.
"""

from __future__ import annotations

import json
import random

import datasets

from fedtune.config.schema import DataConfig
from fedtune.errors import DataError
from fedtune.seeding import derive_seed

QUESTION = "Which newsgroup is this post from?"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_noise(text: str, rate: float, rng: random.Random) -> str:
    """Each letter replaced by a random letter with probability `rate` (other characters kept)."""
    return "".join(rng.choice(LETTERS) if c.isalpha() and rng.random() < rate else c for c in text)


def shifted_rows(texts: list[str], labels: list[str], cfg: DataConfig) -> datasets.Dataset:
    """The task's rows: columns text, label (= the party), chars_cut, messages, options."""
    shift = cfg.shift
    if shift is None:
        raise DataError("data.source '20newsgroups-shift' needs data.shift (groups of topics per labelled party)")
    topics = [t for group in shift.groups for t in group]
    missing = sorted(set(topics) - set(labels))
    if missing or len(set(topics)) != len(topics):
        raise DataError(
            f"data.shift.groups: topics {missing or topics} are unknown or repeated; each topic in one group, from: "
            f"{sorted(set(labels))}"
        )
    party_of = {t: f"source-{i}" for i, group in enumerate(shift.groups) for t in group}
    names = sorted(topics)
    listed = ", ".join(names)
    rng = random.Random(derive_seed(shift.seed, "shift"))
    by_topic: dict[str, list[str]] = {t: [] for t in names}
    for text, label in zip(texts, labels):
        if label in by_topic and (cfg.max_docs_per_label is None or len(by_topic[label]) < cfg.max_docs_per_label):
            by_topic[label].append(text)
    cols: dict[str, list[object]] = {"text": [], "label": [], "chars_cut": [], "messages": [], "options": []}
    for topic in names:
        posts = by_topic[topic]
        rng.shuffle(posts)
        n_target = max(1, round(shift.target_fraction * len(posts)))
        for j, post in enumerate(posts):
            kept = post[: cfg.max_chars_per_doc] if cfg.max_chars_per_doc else post
            target = j < n_target
            shown = char_noise(kept, shift.noise, rng) if target else kept
            user = f"{shown}\n\n{QUESTION} Answer with one of: {listed}."
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": topic}]
            cols["text"].append(shown)
            cols["label"].append("target" if target else party_of[topic])
            cols["chars_cut"].append(len(post) - len(kept))
            cols["messages"].append(json.dumps(msgs))
            cols["options"].append(json.dumps(names))
    return datasets.Dataset.from_dict(cols)

"""Per-client train/validation/test splits, tokenized and packed into fixed-length blocks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedtune.config.schema import DataConfig
from fedtune.data.chat import PromptSet, Renderer, encode_examples, prompt_set
from fedtune.data.dedup import split_order

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class Shard:
    """One client's data: token blocks of shape [n_blocks, block_size] (int64) per split.

    Instruction / chat data: one right-padded example per row, `*_mask` True on the target tokens
    (completions), and `prompts` the evaluation prompts of 'val' and 'test' (`template`: the chat
    template used, 'model' or 'plain'). Raw text: no masks (every token is a target)."""

    client_id: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    num_docs: int
    stats: dict[str, float] = field(default_factory=dict)  # what became of the data (the data report)
    # DP-SGD with unit 'document': the document of each training block, and its real (not pad) tokens
    train_doc: torch.Tensor | None = None
    train_mask: torch.Tensor | None = None
    val_mask: torch.Tensor | None = None
    test_mask: torch.Tensor | None = None
    prompts: Mapping[str, PromptSet] = field(default_factory=dict)
    template: str | None = None

    def mask(self, split: str) -> torch.Tensor | None:
        """The loss mask of `split` (None: every token is a target)."""
        return {"train": self.train_mask, "val": self.val_mask, "test": self.test_mask}[split]

    @property
    def num_examples(self) -> int:
        return int(self.train.shape[0])


@dataclass(frozen=True)
class Corpus:
    """The columns shards are built from, read once from the corpus dataset."""

    texts: list[str]
    chars_cut: list[int] | None = None
    messages: list[str] | None = None
    options: list[str] | None = None

    @classmethod
    def of(cls, ds: datasets.Dataset) -> Corpus:
        cols = ds.column_names

        rows = ds[:] if len(ds) else {c: [] for c in cols}  # one batch (a column iterates row by row)

        def col(name: str) -> list[Any] | None:
            return list(rows[name]) if name in cols else None

        cut = col("chars_cut")
        texts = [str(t) for t in rows["text"]]
        return cls(texts, [int(c) for c in cut] if cut is not None else None, col("messages"), col("options"))


def split_docs(
    texts: list[str], val_fraction: float, test_fraction: float, gen: torch.Generator
) -> tuple[list[str], list[str], list[str]]:
    """Shuffle documents and cut them into train / val / test (test and train never empty)."""
    tr, va, te = split_order(len(texts), val_fraction, test_fraction, gen)
    return [texts[i] for i in tr], [texts[i] for i in va], [texts[i] for i in te]


def pack(texts: list[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, and cut into [n, block_size] blocks (remainder dropped)."""
    return pack_counted(texts, tokenizer, block_size)[0]


def pack_counted(texts: list[str], tokenizer: Any, block_size: int) -> tuple[torch.Tensor, int]:
    """(blocks, tokens before packing): the remainder past the last full block is dropped."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return pack_ids(ids, tokenizer.eos_token_id, block_size)


def pack_ids(ids: Sequence[Sequence[int]], eos: int | None, block_size: int) -> tuple[torch.Tensor, int]:
    """Documents' token ids joined with EOS and cut into [n, block_size] blocks: (blocks, tokens
    before packing; the remainder past the last full block is dropped)."""
    flat: list[int] = []
    for doc in ids:
        flat.extend(doc)
        if eos is not None:
            flat.append(eos)
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size), len(flat)


def pack_documents(
    texts: list[str], tokenizer: Any, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`pack_documents_ids` of the texts' token ids."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return pack_documents_ids(ids, tokenizer.eos_token_id, block_size)


def pack_documents_ids(
    ids: Sequence[Sequence[int]], eos: int | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Each document on its own (+ EOS), cut into blocks, the last one right-padded: (blocks [N, T],
    document of each block [N], real-token mask [N, T], tokens). No block mixes two documents, so a
    document is a well-defined set of blocks (DP-SGD's unit 'document'); pads are never trained on
    (right padding: causal attention never looks at them, and their labels are masked)."""
    pad = eos if eos is not None else 0
    blocks, docs, masks, total = [], [], [], 0
    for d, doc in enumerate(ids):
        seq = list(doc) + ([eos] if eos is not None else [])
        total += len(seq)
        for i in range(0, len(seq), block_size):
            part = seq[i : i + block_size]
            blocks.append(part + [pad] * (block_size - len(part)))
            masks.append([True] * len(part) + [False] * (block_size - len(part)))
            docs.append(d)
    if not blocks:
        empty = torch.zeros((0, block_size), dtype=torch.long)
        return empty, torch.zeros(0, dtype=torch.long), empty.bool(), total
    return torch.tensor(blocks), torch.tensor(docs), torch.tensor(masks), total


def chat_shard(
    cid: str, corpus: Corpus, order: tuple[list[int], list[int], list[int]], tokenizer: Any, cfg: DataConfig
) -> Shard:
    """One client's instruction / chat shard: examples per split (`order`: each split's corpus rows)."""
    assert corpus.messages is not None
    renderer = Renderer(tokenizer)
    rows = sorted({i for idx in order for i in idx})
    convs = {i: json.loads(corpus.messages[i]) for i in rows}
    options = {i: json.loads(corpus.options[i]) if corpus.options and corpus.options[i] else [] for i in rows}
    stats: dict[str, float] = {"chars": sum(len(corpus.texts[i]) for i in rows), "docs_cut": 0, "chars_cut": 0}
    stats["chat_template_plain"] = float(renderer.template == "plain")  # the record says which template
    if corpus.chars_cut is not None:
        cut = [corpus.chars_cut[i] for i in rows]
        stats.update(docs_cut=sum(c > 0 for c in cut), chars_cut=sum(cut))
    tensors, prompts = {}, {}
    for name, idx in zip(("train", "val", "test"), order):
        split = [convs[i] for i in idx]
        cap = cfg.max_train_blocks if name == "train" else cfg.max_test_blocks
        kept = split[:cap]
        ids, mask, counts = encode_examples(kept, renderer, cfg.block_size, cfg.loss_on)
        tensors[name] = (ids, mask)
        if name != "train":
            prompts[name] = prompt_set(kept, [options[i] for i in idx][:cap], renderer, cfg.block_size)
        stats[f"docs_{name}"] = len(split)
        stats[f"blocks_{name}"] = int(ids.shape[0])
        stats[f"tokens_{name}"] = counts["tokens"]
        stats[f"target_tokens_{name}"] = counts["target_tokens"]
        stats["examples_truncated"] = stats.get("examples_truncated", 0) + counts["examples_truncated"]
        stats["examples_dropped"] = stats.get("examples_dropped", 0) + counts["examples_dropped"]
        stats["tokens_dropped"] = stats.get("tokens_dropped", 0) + counts["tokens_cut"]
        stats["blocks_capped"] = stats.get("blocks_capped", 0) + len(split) - len(kept)
    (train, train_mask), (val, val_mask), (test, test_mask) = tensors["train"], tensors["val"], tensors["test"]
    return Shard(
        cid, train, val, test, len(rows), stats, None, train_mask, val_mask, test_mask, prompts, renderer.template
    )


def pooled(shards: Mapping[str, Shard]) -> Shard:
    """All clients' training data in one shard (the centralized upper bound)."""
    first = next(iter(shards.values()))
    masked = [s.train_mask for s in shards.values() if s.train_mask is not None]
    vmasked = [s.val_mask for s in shards.values() if s.val_mask is not None]
    return Shard(
        "pooled",
        torch.cat([s.train for s in shards.values()]),
        torch.cat([s.val for s in shards.values()]),
        first.test[:0],
        sum(s.num_docs for s in shards.values()),
        train_mask=torch.cat(masked) if len(masked) == len(shards) else None,
        val_mask=torch.cat(vmasked) if len(vmasked) == len(shards) else None,
        test_mask=first.test_mask[:0] if first.test_mask is not None else None,
        template=first.template,
    )

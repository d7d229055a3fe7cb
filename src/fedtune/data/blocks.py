"""Per-client train/validation/test splits, tokenized and packed into fixed-length blocks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from fedtune.config.schema import DataConfig
from fedtune.data.chat import PromptSet, Renderer, encode_examples, prompt_set
from fedtune.data.dedup import groups, split_order
from fedtune.errors import DataError
from fedtune.seeding import torch_generator


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
    if not texts:
        return torch.zeros((0, block_size), dtype=torch.long), 0
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
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
    """Each document on its own (+ EOS), cut into blocks, the last one right-padded: (blocks [N, T],
    document of each block [N], real-token mask [N, T], tokens). No block mixes two documents, so a
    document is a well-defined set of blocks (DP-SGD's unit 'document'); pads are never trained on
    (right padding: causal attention never looks at them, and their labels are masked)."""
    if not texts:
        empty = torch.zeros((0, block_size), dtype=torch.long)
        return empty, torch.zeros(0, dtype=torch.long), empty.bool(), 0
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
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
    return torch.tensor(blocks), torch.tensor(docs), torch.tensor(masks), total


def make_shards(
    parts: dict[str, datasets.Dataset], tokenizer: Any, cfg: DataConfig, seed: int, doc_unit: bool = False
) -> dict[str, Shard]:
    """Build every client's shard; raise DataError naming each client that ends up without data.
    `doc_unit`: the training split is packed document by document (DP-SGD's unit 'document').
    A partition with a `messages` column becomes a chat shard (`chat_shard`). With `data.dedup`
    (default: on for chat data) documents sharing a 12-word shingle stay in one split."""
    shards: dict[str, Shard] = {}
    problems: list[str] = []
    for cid, part in parts.items():
        texts = [str(t) for t in part["text"]]
        if len(texts) < 2:
            problems.append(f"client {cid!r} has {len(texts)} document(s); it needs >= 2 (train and test)")
            continue
        chat = "messages" in part.column_names
        dedup = cfg.dedup if cfg.dedup is not None else chat
        gen = torch_generator(seed, "split", cid)
        order = split_order(len(texts), cfg.val_fraction, cfg.test_fraction, gen, groups(texts) if dedup else None)
        if chat:
            shard = chat_shard(cid, part, order, tokenizer, cfg)
            if shard.train.shape[0] == 0 or shard.test.shape[0] == 0:
                problems.append(
                    f"client {cid!r} has {shard.train.shape[0]} train and {shard.test.shape[0]} test "
                    f"examples left after truncation to {cfg.block_size} tokens"
                )
                continue
            shards[cid] = shard
            continue
        tr, va, te = ([texts[i] for i in idx] for idx in order)
        (train, n_tr), (val, n_va), (test, n_te) = (pack_counted(x, tokenizer, cfg.block_size) for x in (tr, va, te))
        train_doc = train_mask = None
        if doc_unit:
            train, train_doc, train_mask, n_tr = pack_documents(tr, tokenizer, cfg.block_size)
        full = {"train": int(train.shape[0]), "val": int(val.shape[0]), "test": int(test.shape[0])}
        if cfg.max_train_blocks is not None:
            train = train[: cfg.max_train_blocks]
            if train_doc is not None and train_mask is not None:
                train_doc, train_mask = train_doc[: cfg.max_train_blocks], train_mask[: cfg.max_train_blocks]
        if cfg.max_test_blocks is not None:
            test = test[: cfg.max_test_blocks]
            val = val[: cfg.max_test_blocks]
        cut = [int(c) for c in part["chars_cut"]] if "chars_cut" in part.column_names else [0] * len(texts)
        stats: dict[str, float] = {
            "docs_train": len(tr),
            "docs_val": len(va),
            "docs_test": len(te),
            "chars": sum(len(t) for t in texts),  # as used (after data.max_chars_per_doc)
            "docs_cut": sum(c > 0 for c in cut),  # by data.max_chars_per_doc
            "chars_cut": sum(cut),
            "tokens_train": n_tr,
            "tokens_val": n_va,
            "tokens_test": n_te,
            "blocks_train": int(train.shape[0]),
            "blocks_val": int(val.shape[0]),
            "blocks_test": int(test.shape[0]),
            # tokens past each split's last full block, and blocks over max_train/test_blocks
            "tokens_dropped": max(0, (n_tr + n_va + n_te) - cfg.block_size * sum(full.values())),
            "blocks_capped": sum(full.values()) - int(train.shape[0] + val.shape[0] + test.shape[0]),
        }
        if train.shape[0] == 0 or test.shape[0] == 0:
            problems.append(
                f"client {cid!r} has {train.shape[0]} train and {test.shape[0]} test blocks of {cfg.block_size} tokens"
            )
            continue
        shards[cid] = Shard(cid, train, val, test, len(texts), stats, train_doc, train_mask)
    if problems:
        raise DataError(
            "some clients have no usable data:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: lower data.block_size, raise data.test_fraction or data.max_docs_per_label, "
            "or use fewer clients"
        )
    return shards


def chat_shard(
    cid: str, part: datasets.Dataset, order: tuple[list[int], list[int], list[int]], tokenizer: Any, cfg: DataConfig
) -> Shard:
    """One client's instruction / chat shard: examples per split (`order` gives each split's rows)."""
    renderer = Renderer(tokenizer)
    convs = [json.loads(m) for m in part["messages"]]
    has = "options" in part.column_names
    options = [json.loads(o) if o else [] for o in part["options"]] if has else [[] for _ in convs]
    stats: dict[str, float] = {"chars": sum(len(str(t)) for t in part["text"]), "docs_cut": 0, "chars_cut": 0}
    stats["chat_template_plain"] = float(renderer.template == "plain")  # the record says which template
    if "chars_cut" in part.column_names:
        cut = [int(c) for c in part["chars_cut"]]
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
        cid, train, val, test, len(convs), stats, None, train_mask, val_mask, test_mask, prompts, renderer.template
    )


def pooled(shards: dict[str, Shard]) -> Shard:
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

"""Every client's shard, built on first use: the corpus is tokenized once (cached on disk, keyed by
the texts and the tokenizer), each client's sizes and data-report counts are computed up front from
token lengths (so a client left without data fails before any training, as with eager shards), and
a shard's tensors are packed only when the client is sampled or evaluated, in a bounded in-memory
cache. Instruction / chat data is rendered with the chat template to be checked, so its shards are
built up front (the available chat corpora have at most a few thousand conversations)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtune.config.schema import DataConfig
from fedtune.data.blocks import Corpus, Shard, chat_shard, pack_documents_ids, pack_ids
from fedtune.data.canaries import add_train_blocks
from fedtune.data.dedup import groups, split_order
from fedtune.errors import DataError
from fedtune.seeding import torch_generator

Order = tuple[list[int], list[int], list[int]]  # a client's train / val / test rows (corpus indices)


class ClientShards(Mapping[str, Shard]):
    """{client id: Shard}, checked up front and built on first use. `stats[cid]` is the client's
    data report (what its documents became) without building it."""

    def __init__(
        self,
        docs: Mapping[str, Sequence[int]],
        corpus: Corpus,
        tokenizer: Any,
        cfg: DataConfig,
        seed: int,
        doc_unit: bool = False,
        cache_size: int = 64,
        extra_train: Mapping[str, torch.Tensor] | None = None,
    ):
        self._docs, self._corpus, self._tokenizer, self._cfg = dict(docs), corpus, tokenizer, cfg
        self._extra = dict(extra_train or {})  # blocks appended to a client's training split (audit canaries)
        self._seed, self._doc_unit, self._cache_size = seed, doc_unit, cache_size
        self._cache: OrderedDict[str, Shard] = OrderedDict()
        self._orders: dict[str, Order] = {}
        self._one_group: list[str] = []  # clients whose documents dedup cannot separate
        self.stats: dict[str, dict[str, float]] = {}
        self._flat = self._offsets = np.zeros(0, dtype=np.int64)
        problems = [
            f"client {c!r} has {len(d)} document(s); it needs >= 2 (train and test)"
            for c, d in self._docs.items()
            if len(d) < 2
        ]
        self._docs = {c: d for c, d in self._docs.items() if len(d) >= 2}
        if corpus.messages is not None:
            problems += self._build_chat()
        else:
            self._flat, self._offsets = tokenize_cached(corpus.texts, tokenizer)
            problems += self._plan_text()
        problems = [
            f"client {c!r}: all its documents share 12-word shingles (one near-duplicate group), so no split "
            "keeps its test text out of training; set data.dedup: false to split them anyway"
            for c in self._one_group
        ] + [p for p in problems if not any(f"client {c!r} has" in p for c in self._one_group)]
        if problems:
            more = f"\n  ... and {len(problems) - 20} more clients" if len(problems) > 20 else ""
            raise DataError(
                f"{len(problems)} client(s) have no usable data:\n  - "
                + "\n  - ".join(problems[:20])
                + more
                + "\nFix: lower data.block_size, raise data.test_fraction or data.max_docs_per_label, "
                "or use fewer clients"
            )

    def __getitem__(self, cid: str) -> Shard:
        if cid in self._cache:
            self._cache.move_to_end(cid)
            return self._cache[cid]
        if cid not in self._orders:
            raise KeyError(cid)
        shard = add_train_blocks(self._build_text(cid), self._extra.get(cid))
        self._cache[cid] = shard
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return shard

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def _order(self, cid: str) -> Order:
        ids = self._docs[cid]
        dedup = self._cfg.dedup if self._cfg.dedup is not None else self._corpus.messages is not None
        gen = torch_generator(self._seed, "split", cid)
        group_of = groups([self._corpus.texts[i] for i in ids]) if dedup else None
        if group_of is not None and len(set(group_of)) == 1 and cid not in self._one_group:
            self._one_group.append(cid)
        tr, va, te = split_order(len(ids), self._cfg.val_fraction, self._cfg.test_fraction, gen, group_of)
        return [ids[i] for i in tr], [ids[i] for i in va], [ids[i] for i in te]

    def _build_chat(self) -> list[str]:
        """Chat shards are rendered to be checked: all are built now and kept."""
        problems = []
        self._cache_size = len(self._docs)
        for cid in self._docs:
            shard = chat_shard(cid, self._corpus, self._order(cid), self._tokenizer, self._cfg)
            if shard.train.shape[0] == 0 or shard.test.shape[0] == 0:
                problems.append(
                    f"client {cid!r} has {shard.train.shape[0]} train and {shard.test.shape[0]} test "
                    f"examples left after truncation to {self._cfg.block_size} tokens"
                )
                continue
            self._cache[cid], self.stats[cid] = add_train_blocks(shard, self._extra.get(cid)), shard.stats
        return problems

    def _plan_text(self) -> list[str]:
        """Each client's split and data report from token lengths alone (no tensors)."""
        problems = []
        bs, cfg, eos = self._cfg.block_size, self._cfg, int(self._tokenizer.eos_token_id is not None)
        lengths = np.diff(self._offsets) + eos
        for cid, ids in self._docs.items():
            order = self._order(cid)
            n_tr, n_va, n_te = (int(lengths[idx].sum()) if idx else 0 for idx in order)
            full_tr = int(np.ceil(lengths[order[0]] / bs).sum()) if self._doc_unit else n_tr // bs
            full = {"train": full_tr, "val": n_va // bs, "test": n_te // bs}
            kept = {
                "train": min(full["train"], cfg.max_train_blocks or full["train"]),
                "val": min(full["val"], cfg.max_test_blocks or full["val"]),
                "test": min(full["test"], cfg.max_test_blocks or full["test"]),
            }
            cut = [self._corpus.chars_cut[i] for i in ids] if self._corpus.chars_cut is not None else [0] * len(ids)
            self.stats[cid] = {
                "docs_train": len(order[0]),
                "docs_val": len(order[1]),
                "docs_test": len(order[2]),
                "chars": sum(len(self._corpus.texts[i]) for i in ids),  # as used (after data.max_chars_per_doc)
                "docs_cut": sum(c > 0 for c in cut),  # by data.max_chars_per_doc
                "chars_cut": sum(cut),
                "tokens_train": n_tr,
                "tokens_val": n_va,
                "tokens_test": n_te,
                "blocks_train": kept["train"],
                "blocks_val": kept["val"],
                "blocks_test": kept["test"],
                # tokens past each split's last full block, and blocks over max_train/test_blocks
                "tokens_dropped": max(0, (n_tr + n_va + n_te) - bs * sum(full.values())),
                "blocks_capped": sum(full.values()) - sum(kept.values()),
            }
            self._orders[cid] = order
            if kept["train"] == 0 or kept["test"] == 0:
                problems.append(
                    f"client {cid!r} has {kept['train']} train and {kept['test']} test blocks of {bs} tokens"
                )
                del self.stats[cid], self._orders[cid]
        return problems

    def _build_text(self, cid: str) -> Shard:
        """A raw-text client's blocks, packed from the tokenized corpus (sizes as planned)."""
        cfg, eos = self._cfg, self._tokenizer.eos_token_id
        tr, va, te = ([self._ids(i) for i in idx] for idx in self._orders[cid])
        (train, _), (val, _), (test, _) = (pack_ids(x, eos, cfg.block_size) for x in (tr, va, te))
        train_doc = train_mask = None
        if self._doc_unit:
            train, train_doc, train_mask, _ = pack_documents_ids(tr, eos, cfg.block_size)
            train_doc, train_mask = train_doc[: cfg.max_train_blocks], train_mask[: cfg.max_train_blocks]
        train, val, test = train[: cfg.max_train_blocks], val[: cfg.max_test_blocks], test[: cfg.max_test_blocks]
        num_docs = len(self._docs[cid])
        return Shard(cid, train, val, test, num_docs, dict(self.stats[cid]), train_doc, train_mask)

    def _ids(self, doc: int) -> list[int]:
        ids: list[int] = self._flat[self._offsets[doc] : self._offsets[doc + 1]].tolist()
        return ids


def tokenize_cached(texts: Sequence[str], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The texts' token ids (no special tokens), concatenated, and each text's offsets into them.
    Cached on disk under the fedtune cache, keyed by the texts and the tokenizer's definition (a
    changed file or tokenizer gets a new key, never a stale entry)."""
    from fedtune.cache import cache_dir

    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    path = cache_dir() / "tokens" / f"{h.hexdigest()[:32]}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["flat"], z["offsets"]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(offsets[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, flat=flat, offsets=offsets)
    os.replace(tmp, path)  # whole or not at all
    return flat, offsets


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides a tokenizer's ids: its class, its full definition (fast tokenizers) or
    vocabulary, and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return f"{type(tokenizer).__name__}\0{body}\0{special}"

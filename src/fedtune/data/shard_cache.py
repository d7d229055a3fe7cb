"""One party's shard on its own disk. On Flower's deployment every message runs in a fresh ClientApp
process, which would otherwise read, partition and tokenize the whole corpus again (and import
`datasets` and flwr-datasets) to build one shard; with the shard cached, a node reads one file.

The file is named by a hash of everything that decides the shard: the data and partition
configs, the seed, the DP unit (document-level packing), the tokenizer's definition, the
partition id, and for a user's files their names, sizes and modification times. A changed config,
tokenizer or file gets a new name and is built afresh, never read stale. Written atomically
(safetensors: the tensors, and the rest as JSON in its metadata)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fedtune.config import ExperimentConfig
from fedtune.data.blocks import Shard
from fedtune.data.chat import PromptSet
from fedtune.data.shards import tokenizer_fingerprint
from fedtune.files import write_atomic_with

FORMAT = 1  # raise when the file's layout or the way shards are built changes
TENSORS = ("train", "val", "test", "train_doc", "train_mask", "val_mask", "test_mask")


def files_fingerprint(path: str | None) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime in ns) of the data file or of every file under the data folder."""
    if path is None:
        return []
    root = Path(path).expanduser()
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    out = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        out.append((str(f.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def shard_key(cfg: ExperimentConfig, tokenizer: Any, partition_id: int) -> str:
    """The cache name of partition `partition_id`'s shard under `cfg` (see the module docstring)."""
    dp = cfg.train.dp_sgd
    facts = {
        "format": FORMAT,
        "data": cfg.data.model_dump(mode="json"),
        "partition": cfg.partition.model_dump(mode="json"),
        "seed": cfg.seed,
        "document_unit": dp is not None and dp.unit == "document",
        "partition_id": partition_id,
        "files": files_fingerprint(cfg.data.path),
    }
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    h.update(b"\0" + tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:32]


def save_shard(path: Path, client_ids: list[str], shard: Shard) -> None:
    """Write `shard` (and the run's client ids, in partition order) to `path`, whole or not at all."""
    tensors = {k: getattr(shard, k).contiguous() for k in TENSORS if getattr(shard, k) is not None}
    meta = {
        "client_ids": client_ids,
        "client_id": shard.client_id,
        "num_docs": shard.num_docs,
        "stats": shard.stats,
        "prompts": {split: dataclasses.asdict(p) for split, p in shard.prompts.items()},
        "template": shard.template,
    }
    data = save(tensors, metadata={"fedtune-shard": json.dumps(meta)})
    write_atomic_with(path, lambda f: f.write(data), mode=0o600)  # a party's data stays its own


def load_shard(path: Path) -> tuple[list[str], Shard] | None:
    """(client ids, shard) from a file `save_shard` wrote; None if it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["fedtune-shard"])
            tensors: dict[str, torch.Tensor] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, KeyError, ValueError, SafetensorError):  # torn or foreign: rebuilt by the caller
        return None
    prompts = {split: PromptSet(**p) for split, p in meta["prompts"].items()}
    shard = Shard(
        meta["client_id"],
        num_docs=meta["num_docs"],
        stats=meta["stats"],
        prompts=prompts,
        template=meta["template"],
        **{k: tensors.get(k) for k in TENSORS},  # type: ignore[arg-type]
    )
    return list(meta["client_ids"]), shard


def cached_shard(root: Path, key: str, build: Callable[[], tuple[list[str], Shard]]) -> tuple[list[str], Shard]:
    """(client ids, shard) from `root/KEY.safetensors`, else from `build()`, written there."""
    path = root / f"{key}.safetensors"
    hit = load_shard(path)
    if hit is not None:
        return hit
    ids, shard = build()
    save_shard(path, ids, shard)
    return ids, shard

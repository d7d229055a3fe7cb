"""Using an embedding run's exported model: plain transformers + PEFT for the decoder and the
LoRA adapter, safetensors for the GEM vectors, and GEM's pooling (`fedtune.embedding.gem.embed_ids`:
the k vectors appended after the text, the mean of their final-layer hidden states)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.embedding.gem import embed_ids
from fedtune.errors import FedtuneError

GEM_TOKENS_FILE = "gem_tokens.safetensors"
GEM_CONFIG_FILE = "gem.json"


def load_gem(run_dir: Path, client: str | None = None) -> tuple[Any, Any, torch.Tensor, int]:
    """(PEFT model, tokenizer, GEM vectors [k, hidden], max tokens per text) of a run's global (or
    a client's own) exported model."""
    from safetensors.torch import load_file

    from fedtune.models.export import exported_adapter, load_exported

    adapter = exported_adapter(run_dir, client)
    if not (adapter / GEM_TOKENS_FILE).exists():
        raise FedtuneError(f"{adapter} has no {GEM_TOKENS_FILE}: `fedtune embed` needs a run with task: embedding")
    model, tokenizer = load_exported(run_dir, client)
    tokens = load_file(str(adapter / GEM_TOKENS_FILE))["tokens"]
    meta = json.loads((adapter / GEM_CONFIG_FILE).read_text())
    return model, tokenizer, tokens, int(meta["max_tokens"])


def embed_texts(run_dir: Path, texts: list[str], client: str | None = None, batch_size: int = 8) -> np.ndarray:
    """GEM embeddings [N, hidden] (float32) of `texts` by a run's exported model."""
    model, tokenizer, tokens, limit = load_gem(run_dir, client)
    ids = [x[:limit] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise FedtuneError(f"text(s) {empty[:10]} (0-based lines) are empty; give one non-empty text per line")
    return embed_ids(model, ids, tokens, batch_size).numpy().astype(np.float32)


def embed_file(run_dir: Path, file: Path, out: Path | None = None, client: str | None = None) -> Path:
    """Embed each non-empty line of `file`; write a .npy [N, hidden] (default: FILE with .npy)."""
    if not file.exists():
        raise FedtuneError(f"{file} does not exist; give a text file with one text per line")
    texts = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    target = out if out is not None else file.with_suffix(".npy")
    np.save(target, embed_texts(run_dir, texts, client))
    return target

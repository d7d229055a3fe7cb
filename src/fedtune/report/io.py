"""Files of a run directory, written atomically (write to a temp file, then rename): nothing
half-written survives an interruption."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fedtune.files import append_jsonl, remove_temp_files, write_atomic, write_atomic_with

__all__ = ["append_jsonl", "remove_temp_files", "write_atomic", "write_atomic_with"]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
TOKEN = ".run-token"  # a random id of this run (clients keep their state per run)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    write_atomic_with(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = torch.load(path, weights_only=False)
    return out


def new_token(run_dir: Path) -> str:
    import secrets

    token = secrets.token_hex(8)
    write_atomic(run_dir / TOKEN, token)
    return token


def run_token(run_dir: Path) -> str:
    """The run's token (written when the run started)."""
    f = Path(run_dir) / TOKEN
    return f.read_text().strip() if f.exists() else ""

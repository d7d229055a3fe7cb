"""Crash-safe files: atomic writes (temp file, fsync, rename, fsync the folder) and fsynced appends.
Files follow the user's umask."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_with(path: Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """Write `path` through a temp file in the same folder: fsync the file, rename it over the
    target, fsync the folder. The temp file is removed if writing fails; files get the user's
    umask (a team can read each other's runs), or exactly `mode` from creation when given (0o600:
    owner-only secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if mode is not None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            os.fchmod(fd, mode)  # whatever the umask
        with open(tmp, "wb") if mode is None else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically with the user's umask (safetensors' own `save_file`
    creates it in place, readable by its owner only)."""
    from safetensors.torch import save

    write_atomic(path, save(tensors, metadata=metadata))


def write_atomic(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    write_atomic_with(path, lambda f: f.write(raw))


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records (one JSON object per line), flushed and fsynced."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def remove_temp_files(folder: Path) -> None:
    """Temp files a killed writer left behind (`.NAME.tmp-PID`)."""
    for p in folder.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent` (for a write-then-rename), with the user's umask (mkdtemp would
    make it private to the owner, 0700)."""
    import secrets

    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(path)
    return path

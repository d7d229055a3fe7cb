"""Files of a run directory, written atomically (write to a temp file, then rename): nothing
half-written survives an interruption."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import FedtuneError, ResumeError
from fedtune.files import append_jsonl, remove_temp_files, write_atomic, write_atomic_with

__all__ = ["append_jsonl", "remove_temp_files", "write_atomic", "write_atomic_with"]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
STATUS = "status.json"  # running | failed (with the error and what to do) | complete
ERROR_LOG = "error.log"
TOKEN = ".run-token"  # a random id of this run (clients keep their state per run)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file. A last line without its newline is an append a crash cut
    short (`files.append_jsonl` writes line + newline, fsynced): it never completed, so it is not
    a record; any other line that is not JSON is damage, named by file and line."""
    text = path.read_text()
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # the cut append (or nothing)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FedtuneError(f"{path} line {i + 1} is not JSON ({e.msg}): the file is damaged") from None
    return out


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    write_atomic_with(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint (written atomically: a damaged one was changed after it was written)."""
    try:
        out: dict[str, Any] = torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # what torch raises for a cut or foreign file
        raise ResumeError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}): the file is damaged") from None
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


def write_status(run_dir: Path, state: str, **info: Any) -> None:
    write_atomic(run_dir / STATUS, json.dumps({"state": state, **info}, indent=2, sort_keys=True))


def read_status(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / STATUS
    try:
        out: dict[str, Any] = json.loads(f.read_text()) if f.exists() else {}
    except json.JSONDecodeError:
        out = {}
    return out


def mark_failed(run_dir: Path, error: BaseException, new: bool) -> None:
    """After an error: a new run that never checkpointed a round and failed on its config or data
    leaves no directory; otherwise the directory says `failed`, with the full traceback in
    error.log and what to do next."""
    import shutil
    import traceback

    from fedtune.errors import FedtuneError

    if not run_dir.exists():
        return
    started = (run_dir / CHECKPOINT).exists()
    if new and not started and isinstance(error, FedtuneError):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    write_atomic(run_dir / ERROR_LOG, text)
    if started:
        fix = f"fix the cause and continue with `fedtune run --resume {run_dir}`"
    else:
        fix = "fix the cause and run the same command again (nothing was trained yet)"
    what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    write_status(run_dir, "failed", error=what[:2000], fix=fix, log=str(run_dir / ERROR_LOG))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """The run directory, ready: checked for resuming (temp files of an interrupted write removed), or
    new (an existing run is replaced only with `overwrite`, or when it failed before round 1)."""
    if resume:
        if not (run_dir / CHECKPOINT).exists():
            raise ResumeError(f"{run_dir} has no {CHECKPOINT}; nothing to resume (run without --resume)")
        remove_temp_files(run_dir)
        return run_dir
    if run_dir.is_file():
        raise FedtuneError(f"output dir {run_dir} is a file; set output_dir (or name) to a folder")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / TOKEN).exists() and not (run_dir / STATUS).exists():  # never delete what is not a run
            raise FedtuneError(
                f"output dir {run_dir} is not empty and holds no fedtune run (no {STATUS} or {TOKEN}); nothing "
                "there is touched: set output_dir (or name) to a new or empty folder"
            )
        state = read_status(run_dir).get("state")
        restartable = state == "failed" and not (run_dir / CHECKPOINT).exists()  # failed before round 1
        if not overwrite and not restartable:
            raise FedtuneError(
                f"output dir {run_dir} already holds a run ({state or 'unknown state'}); use `fedtune run --resume "
                f"{run_dir}` to continue it, --overwrite to replace it, or --set name=OTHER"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    new_token(run_dir)
    return run_dir

"""A user's own files, read whole or with a clear error: nothing is dropped, decoded wrongly or
copied elsewhere without a word.

Layouts (`data.path`):
- a folder with one sub-folder per client: each sub-folder's files are that client's documents
  (the folder name is the label); an empty sub-folder is an error naming it;
- a single file or a flat folder: the documents of all clients (`label_column` partitions them).
Files: `.txt` (documents by `data.split_documents`: `file` = one document per file, `line` = one per
non-empty line, `blank-line` = paragraphs separated by blank lines), `.jsonl` / `.json` (one document
per row), `.csv`, `.parquet` (one per row). A file of another type (`.DS_Store`, `notes.md`) is an
error listing every such path. Text must be UTF-8: an undecodable file is an error naming it and the
byte offset, or, with `data.on_decode_error: skip`, left out and counted in the data report.
Tabular files are read with pandas in memory: a party's private data is never copied into a cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config.schema import DataConfig
from fedtune.data.chat import row_conversation
from fedtune.errors import DataError

TEXT = {".txt"}
TABLE = {".jsonl", ".json", ".csv", ".parquet"}


@dataclass
class FileReport:
    """What reading the files did besides returning documents."""

    files: int = 0
    skipped: list[str] = field(default_factory=list)  # undecodable files left out (on_decode_error: skip)


def _decode(f: Path, cfg: DataConfig, report: FileReport) -> str | None:
    raw = f.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if cfg.on_decode_error == "skip":
            report.skipped.append(str(f))
            return None
        raise DataError(
            f"{f} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 4]!r}); convert it to UTF-8, "
            "remove it, or set data.on_decode_error: skip to leave such files out (they are counted)"
        ) from None


def _split(text: str, how: str) -> list[str]:
    if how == "line":
        return [x for x in text.splitlines() if x.strip()]
    if how == "blank-line":
        paragraphs, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                paragraphs.append("\n".join(cur))
                cur = []
        if cur:
            paragraphs.append("\n".join(cur))
        return paragraphs
    return [text] if text.strip() else []


def _table(f: Path, cfg: DataConfig) -> tuple[list[str], list[str] | None]:
    import pandas as pd

    suffix = f.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            df = pd.read_json(f, lines=suffix == ".jsonl" or _looks_like_lines(f), dtype=False)
        elif suffix == ".csv":
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{f} could not be read as {suffix} ({e}); fix the file or remove it") from None
    if cfg.format != "text":  # instruction rows: each becomes JSON {text, messages, options}
        texts = []
        for i, row in enumerate(df.to_dict("records")):
            conv, opts = row_conversation(row, cfg.format, cfg.columns, f"{f} row {i + 1}")
            joined = "\n".join(m["content"] for m in conv)
            texts.append(json.dumps({"text": joined, "messages": conv, "options": opts}))
    elif cfg.text_column not in df.columns:
        raise DataError(f"data.text_column = {cfg.text_column!r} is not a column of {f}; columns: {list(df.columns)}")
    else:
        texts = [_cell(t, f, i, f"data.text_column {cfg.text_column!r}") for i, t in enumerate(df[cfg.text_column])]
    labels = None
    if cfg.label_column in df.columns:
        where = f"data.label_column {cfg.label_column!r}"
        labels = [_cell(x, f, i, where, numbers=True) for i, x in enumerate(df[cfg.label_column])]
    return texts, labels


def _cell(value: Any, f: Path, i: int, where: str, numbers: bool = False) -> str:
    """One table cell as text: a non-empty string (a label may also be an integer); a missing,
    empty, null or structured value is refused by file and row (it became the text "nan", or a
    client named "nan", before)."""
    ok = isinstance(value, str) or (numbers and isinstance(value, int) and not isinstance(value, bool))
    if not ok or not str(value).strip():
        raise DataError(
            f"{f} row {i + 1}: {where} is {value!r}, not a non-empty string; fix or remove the row "
            "(every row needs its text" + (" and its label" if numbers else "") + ")"
        )
    return str(value)


def _looks_like_lines(f: Path) -> bool:
    with open(f, "rb") as fh:
        head = fh.read(1).strip()
    return head != b"["


def _documents(files: list[Path], cfg: DataConfig, report: FileReport) -> tuple[list[str], list[str] | None]:
    """Documents (and row labels, for tables with a label column) of one group of files."""
    texts: list[str] = []
    labels: list[str] | None = None
    for f in files:
        report.files += 1
        if f.suffix.lower() in TEXT and cfg.format != "text":
            raise DataError(
                f"{f} is a text file but data.format = {cfg.format!r} reads rows; give .jsonl / .csv / .parquet "
                "files with the instruction columns, or set data.format: text"
            )
        if f.suffix.lower() in TEXT:
            text = _decode(f, cfg, report)
            if text is not None:
                texts += _split(text, cfg.split_documents)
            continue
        if f.suffix.lower() in (".jsonl", ".json", ".csv") and _decode(f, cfg, report) is None:
            continue  # not UTF-8, and on_decode_error: skip (counted); parquet is binary
        rows, row_labels = _table(f, cfg)
        texts += rows
        if row_labels is not None:
            labels = (labels or []) + row_labels
    if labels is not None and len(labels) != len(texts):
        raise DataError(
            f"data.label_column = {cfg.label_column!r} is in some files of {files[0].parent} but not all; "
            "add it to every file or drop it"
        )
    return texts, labels


def _listing(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    stray = [str(f) for f in files if f.suffix.lower() not in TEXT | TABLE]
    if stray:
        raise DataError(
            f"{len(stray)} file(s) under {folder} are not data fedtune reads ({', '.join(sorted(TEXT | TABLE))}): "
            + ", ".join(stray[:10])
            + (" ..." if len(stray) > 10 else "")
            + "; move them out of data.path"
        )
    kinds = {f.suffix.lower() in TEXT for f in files}
    if len(kinds) > 1:
        raise DataError(f"{folder} mixes text and table files; use one kind per folder")
    return files


def read_user_files(cfg: DataConfig) -> tuple[list[str], list[str], FileReport]:
    """(documents, labels, report) of `data.path` (module docstring)."""
    if not cfg.path:
        raise DataError("data.source 'files' needs data.path (a file or a folder)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path = {cfg.path!r} does not exist; give an existing file or folder")
    report = FileReport()
    subdirs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    if subdirs:  # folder per client: the folder name is the label
        loose = [str(f) for f in path.iterdir() if f.is_file()]
        if loose:
            raise DataError(
                f"data.path {path} has one sub-folder per client and also files at the top: {', '.join(loose[:10])}; "
                "move them into a client's folder or out of data.path"
            )
        texts: list[str] = []
        labels: list[str] = []
        for d in subdirs:
            fs = _listing(d)
            docs, _ = _documents(fs, cfg, report) if fs else ([], None)
            if not docs:
                raise DataError(
                    f"client folder {d} has no documents ({len(fs)} files); add its data or remove the folder"
                )
            texts += docs
            labels += [d.name] * len(docs)
        return texts, labels, report
    fs = [path] if path.is_file() else _listing(path)
    if fs[0].suffix.lower() not in TEXT | TABLE:
        raise DataError(f"{fs[0]} is not a data file fedtune reads; use one of {sorted(TEXT | TABLE)}")
    docs, row_labels = _documents(fs, cfg, report)
    if not docs:
        raise DataError(f"data.path {path} holds no documents")
    if fs[0].suffix.lower() in TEXT and len(docs) == 1:
        raise DataError(
            f"{path} is one document (data.split_documents = {cfg.split_documents!r}); a client needs several "
            "(train and test never share a document): set data.split_documents: line or blank-line, or give "
            "a folder of files"
        )
    return docs, row_labels or ["all"] * len(docs), report


def describe(report: FileReport) -> dict[str, Any]:
    return {"files_read": report.files, "files_skipped": report.skipped}

"""A user's folders of text become documents whole, or fail with a message naming the file or
client (each case was silent on the landed code: cut, mangled, dropped, or a vague error)."""

import os
from pathlib import Path

import pytest

from fedtune.config.schema import DataConfig
from fedtune.data.files import read_user_files
from fedtune.errors import DataError


def folder(tmp_path: Path, layout: dict[str, dict[str, bytes | str]]) -> Path:
    root = tmp_path / "data"
    for client, files in layout.items():
        (root / client).mkdir(parents=True)
        for name, content in files.items():
            p = root / client / name
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return root


def cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(source="files", path=str(path), **kw)


def test_a_long_file_is_one_whole_document(tmp_path) -> None:
    long = "def f():\n    return 1\n" * 2000  # 44,000 characters: the landed default cut it to 4,000
    root = folder(tmp_path, {"a": {"x.txt": long, "y.txt": "short one"}, "b": {"z.txt": "b1", "w.txt": "b2"}})
    texts, labels, report = read_user_files(cfg(root))
    assert long in texts and labels.count("a") == 2 and report.files == 4
    from fedtune.data.sources import load_corpus

    ds = load_corpus(cfg(root))
    assert max(len(t) for t in ds["text"]) == len(long) and sum(ds["chars_cut"]) == 0


def test_a_single_file_client_is_one_document_not_one_per_line(tmp_path) -> None:
    lines = "\n".join(f"line {i} of one story" for i in range(40))
    root = folder(tmp_path, {"a": {"story.txt": lines}, "b": {"1.txt": "x", "2.txt": "y"}})
    texts, labels, _ = read_user_files(cfg(root))
    assert labels.count("a") == 1 and lines in texts  # the landed code made 40 documents of it
    texts, labels, _ = read_user_files(cfg(root, split_documents="line"))  # only when asked
    assert labels.count("a") == 40


def test_an_empty_client_folder_is_an_error_naming_it(tmp_path) -> None:
    root = folder(tmp_path, {"a": {"1.txt": "x", "2.txt": "y"}, "b": {}})
    with pytest.raises(DataError, match=f"client folder {root / 'b'} has no documents"):
        read_user_files(cfg(root))


def test_a_non_utf8_file_is_an_error_naming_it_or_skipped_and_counted(tmp_path) -> None:
    bad = b"caf\xe9 au lait"  # latin-1
    root = folder(tmp_path, {"a": {"1.txt": "x", "2.txt": bad, "3.txt": "z"}})
    with pytest.raises(DataError, match=r"2\.txt is not UTF-8 text \(byte 3"):
        read_user_files(cfg(root))
    texts, _, report = read_user_files(cfg(root, on_decode_error="skip"))
    assert texts == ["x", "z"] and report.skipped == [str(root / "a" / "2.txt")]
    # tables too (the option was ignored for .jsonl / .csv: always an error)
    tables = folder(
        tmp_path / "t", {"a": {"1.jsonl": '{"text": "x"}\n{"text": "y"}\n', "2.jsonl": b'{"text": "' + bad + b'"}\n'}}
    )
    with pytest.raises(DataError, match=r"2\.jsonl is not UTF-8 text"):
        read_user_files(cfg(tables))
    texts, _, report = read_user_files(cfg(tables, on_decode_error="skip"))
    assert texts == ["x", "y"] and report.skipped == [str(tables / "a" / "2.jsonl")]


def test_stray_files_are_listed_by_path(tmp_path) -> None:
    root = folder(tmp_path, {"a": {"1.txt": "x", "2.txt": "y", ".DS_Store": b"\0\1"}})
    with pytest.raises(DataError, match=r"\.DS_Store; move them out of data.path"):
        read_user_files(cfg(root))


def test_jsonl_client_data_is_never_copied_into_the_huggingface_cache(tmp_path, monkeypatch) -> None:
    """The landed code read .jsonl / .csv with `datasets.load_dataset`, which writes a copy into
    ~/.cache/huggingface/datasets."""
    hf = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf)  # read at call time by load_dataset
    import json

    rows = "\n".join(
        json.dumps({"text": f"private record {i}", "label": "ward-a" if i % 2 else "ward-b"}) for i in range(8)
    )
    f = tmp_path / "records.jsonl"
    f.write_text(rows)
    from fedtune.data.sources import load_corpus

    ds = load_corpus(cfg(f))
    assert sorted(set(ds["label"])) == ["ward-a", "ward-b"] and len(ds) == 8
    for d in (hf, tmp_path / "hf-home"):
        assert not d.exists() or not any(os.scandir(d))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('{"text": "a", "label": "x"}\n{"label": "x"}\n', "row 2: data.text_column 'text' is nan"),  # became "nan"
        ('{"text": "a", "label": "x"}\n{"text": null, "label": "x"}\n', "row 2: data.text_column 'text'"),
        ('{"text": "a", "label": "x"}\n{"text": 12345, "label": "x"}\n', "row 2: data.text_column 'text' is 12345"),
        ('{"text": ["a", "b"], "label": "x"}\n', "row 1: data.text_column 'text' is ['a', 'b']"),
        ('{"text": "a", "label": "x"}\n{"text": "b"}\n', "row 2: data.label_column 'label' is nan"),  # client "nan"
    ],
)
def test_a_missing_or_non_text_cell_is_refused_by_file_and_row(tmp_path, rows: str, message: str) -> None:
    f = tmp_path / "all.jsonl"
    f.write_text(rows)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_user_files(cfg(f))


def test_an_empty_csv_cell_is_refused_and_integer_labels_are_kept(tmp_path) -> None:
    f = tmp_path / "all.csv"
    f.write_text("text,label\nhello,x\n,y\n")
    with pytest.raises(DataError, match="row 2: data.text_column 'text' is ''"):
        read_user_files(cfg(f))
    g = tmp_path / "ints.jsonl"
    g.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n')
    texts, labels, _ = read_user_files(cfg(g))
    assert texts == ["a", "b"] and labels == ["1", "2"]


def test_documents_past_max_docs_per_label_are_counted_and_said(tmp_path) -> None:
    """data.max_docs_per_label kept 8 of 20 documents a client and the report said 'every
    document is used whole'; the source now counts what the cap left out."""
    import json

    from fedtune.data.report import cut_message, stats_summary
    from fedtune.data.sources import load_corpus

    root = folder(tmp_path, {c: {f"{i}.txt": f"{c} doc {i}" for i in range(20)} for c in ("a", "b")})
    ds = load_corpus(cfg(root, max_docs_per_label=8))
    facts = json.loads(ds.info.description)
    assert len(ds) == 16 and facts["docs_over_label_cap"] == 24 and facts["files_read"] == 40
    summary = stats_summary({}, facts)
    assert cut_message(summary, None, 8) == "data.max_docs_per_label = 8 left out 24 documents of the chosen labels"
    whole = load_corpus(cfg(root))
    assert json.loads(whole.info.description)["docs_over_label_cap"] == 0
    assert cut_message(stats_summary({}, json.loads(whole.info.description)), None) is None

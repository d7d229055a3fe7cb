import json

import pytest

from fedtune.config.schema import DataConfig, PartitionConfig
from fedtune.data.partition import partition
from fedtune.data.sources import load_corpus
from fedtune.errors import DataError


def test_jsonl_file_with_a_label_column(tmp_path) -> None:
    f = tmp_path / "notes.jsonl"
    rows = [
        {"body": f"note {i} about {'cardiology' if i % 2 else 'oncology'}", "ward": "cardio" if i % 2 else "onco"}
        for i in range(10)
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_corpus(DataConfig(source="files", path=str(f), text_column="body", label_column="ward"))
    assert sorted(set(ds["label"])) == ["cardio", "onco"] and len(ds) == 10
    parts = partition(ds, PartitionConfig(kind="natural"), seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"cardio": 5, "onco": 5}


def test_folder_per_client_layout(tmp_path) -> None:
    for client, n in (("hospital_a", 3), ("hospital_b", 2)):
        d = tmp_path / client
        d.mkdir()
        for i in range(n):
            (d / f"doc{i}.txt").write_text(f"{client} document {i}\nsecond line")
    ds = load_corpus(DataConfig(source="files", path=str(tmp_path)))
    assert sorted(ds["label"]) == ["hospital_a"] * 3 + ["hospital_b"] * 2
    assert "second line" in ds["text"][0]  # one document per file


def test_csv_and_a_missing_text_column(tmp_path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("text,label\nhello there,a\ngeneral kenobi,b\n")
    assert load_corpus(DataConfig(source="files", path=str(f)))["label"] == ["a", "b"]
    with pytest.raises(DataError, match="data.text_column = 'content' is not a column"):
        load_corpus(DataConfig(source="files", path=str(f), text_column="content"))


def test_unknown_labels_are_named() -> None:
    with pytest.raises(DataError, match=r"data.labels = \['nope'\] not found"):
        load_corpus(DataConfig(source="stdlib", labels=["json", "nope"]))


def test_chatterbot_gives_valid_alternating_chats_by_topic() -> None:
    from fedtune.data.chat import check_messages

    ds = load_corpus(DataConfig(source="chatterbot"))
    assert {"ai", "computers", "food", "history"} <= set(ds["label"])
    for i, m in enumerate(ds["messages"]):
        turns = check_messages(json.loads(m), f"row {i}")
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    first = json.loads(ds.filter(lambda r: r["label"] == "ai")["messages"][0])
    assert first[0]["content"] == "What is AI?" and first[1]["content"].startswith("Artificial Intelligence is")


def test_stdlib_docstrings_ask_for_a_function_and_answer_with_its_code_without_the_docstring() -> None:
    import ast
    import inspect

    ds = load_corpus(DataConfig(source="stdlib-docstrings", labels=["json"]))
    pairs = {}
    for m in ds["messages"]:
        user, assistant = json.loads(m)
        assert user["content"].startswith("Write the function `")
        ast.parse(assistant["content"])  # the code minus its docstring is still valid Python
        pairs[user["content"].split("`")[1]] = (user["content"], assistant["content"])
    ask, code = pairs["dumps"]
    doc = inspect.getdoc(json.dumps)
    assert doc and doc.splitlines()[0] in ask and doc.splitlines()[0] not in code
    assert code.startswith("def dumps(") and "return cls(" in code

"""`train.packing` end to end on the tiny model: a federated instruction run with packed batches
gives the unpacked run's records (to float rounding), and packing really happened."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import ROOT, chat_data, chat_folder


def varied_chat(root: Path) -> Path:
    """Two clients asking about colours, one prompt in four with 20 filler words: rows of very
    different lengths (about 60 and 200 bytes), as real instruction data has."""
    return chat_folder(root, 16, lambda i: " ".join(["please"] * (20 if i % 4 == 0 else 1)) + ": ", None)


def _close(a: object, b: object, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not math.isnan(a):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), where
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where  # type: ignore[arg-type]


def test_a_packed_run_gives_the_unpacked_runs_records(tmp_path, monkeypatch, no_time) -> None:
    from fedtune.client import train
    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    data = varied_chat(tmp_path / "data")
    over = [
        *chat_data(data, 256, 0.25),
        "rounds=2",
        "train.steps=3",
        "evaluation.max_examples=4",
    ]
    plain = run_federated(
        load_config(ROOT / "configs" / "tiny.yaml", [*over, f"output_dir={tmp_path / 'a'}"]), progress=False
    )
    saved = []
    real = train.pack_rows

    def spy(batch, mask):  # type: ignore[no-untyped-def]
        out = real(batch, mask)
        saved.append(0 if out is None else batch.shape[0] - out.ids.shape[0])
        return out

    monkeypatch.setattr(train, "pack_rows", spy)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*over, "train.packing=true", f"output_dir={tmp_path / 'b'}"])
    packed = run_federated(cfg, progress=False)
    assert len(saved) == 2 * 2 * 3 and sum(saved) > 0, saved  # 2 rounds x 2 clients x 3 steps
    a, b = no_time(plain.records), no_time(packed.records)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        _close(ra, rb, f"round {ra['round']} client {ra['client']}")

"""model.device and model.dtype: checked before any weights load, recorded in every run, and the
bf16 base keeps fp32 adapters (master weights) that train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.config import config_from_dict
from fedtune.errors import ConfigError
from fedtune.report.io import read_jsonl


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return [str(p) for p in e.value.problems]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_missing_gpu_is_refused_by_name() -> None:
    (p,) = problems({"model": {"name": "tiny", "device": "cuda:1"}})
    assert p.startswith("model.device = 'cuda:1': no CUDA device") and "auto" in p


def test_a_bad_device_string_is_refused() -> None:
    (p,) = problems({"model": {"name": "tiny", "device": "gpu"}})
    assert p.startswith("model.device = 'gpu'")


def test_a_bf16_base_needs_autocast_and_an_fp32_base_for_merging_strategies() -> None:
    (p,) = problems({"model": {"name": "tiny", "dtype": "bfloat16"}})
    assert "train.bf16: true" in p
    bf16 = {"model": {"name": "tiny", "dtype": "bfloat16"}, "train": {"bf16": True}}
    ps = problems({**bf16, "strategy": {"name": "flora"}})
    assert len(ps) == 1 and "writes offsets into the base weights" in ps[0]
    full = {"name": "fedkseed", "full": True}
    assert problems({**bf16, "strategy": full})
    config_from_dict(bf16)  # fedavg: fine


def test_a_bf16_base_trains_fp32_adapters_and_the_run_records_where_it_ran(tiny_cfg) -> None:
    from fedtune.engines.inprocess import inprocess_federation
    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("model.dtype=bfloat16", "train.bf16=true", "rounds=1")
    fed = inprocess_federation(cfg)
    trained = [p for p in fed.model.parameters() if p.requires_grad]
    frozen = [p for p in fed.model.parameters() if not p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    run_federated(cfg, progress=False)
    records = read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl")
    first = next(r for r in records if r["round"] == 0 and r["client"] is None)
    assert first["device"] == "cpu" and first["base_dtype"] == "bfloat16"
    train = [r for r in records if r.get("round") == 1 and "train_loss" in r]
    assert train and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_same_run_on_the_gpu_matches_the_cpu(tiny_cfg, no_time) -> None:
    from fedtune.recipes.federated import run_federated

    out = {}
    for dev in ("cpu", "cuda"):
        cfg = tiny_cfg(f"model.device={dev}", name=dev)
        run_federated(cfg, progress=False)
        out[dev] = [r for r in read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl") if "global_loss" in r]
    for a, b in zip(out["cpu"], out["cuda"]):
        assert a["global_loss"] == pytest.approx(b["global_loss"], rel=1e-3)

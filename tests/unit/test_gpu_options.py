"""model.quantize (QLoRA through bitsandbytes) and model.kernels (Liger): refused by name where they
cannot run, recorded where they do; the GPU tests run wherever a CUDA device is visible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.config import config_from_dict
from fedtune.errors import ConfigError
from fedtune.models.gpu import installed, kernels_problems, quantize_problems
from fedtune.report.io import read_jsonl


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return [str(p) for p in e.value.problems]


def test_a_quantized_base_on_a_cpu_is_refused_by_name() -> None:
    ps = problems({"model": {"name": "tiny", "device": "cpu", "quantize": "4bit"}})
    assert ps[0].startswith("model.quantize = '4bit': ") and "CUDA GPU" in ps[0] and "device is cpu" in ps[0]
    assert "model.quantize: none" in ps[0]


def test_a_quantized_base_refuses_strategies_that_write_into_it() -> None:
    offsets = "strategy 'flora' writes offsets into the base weights"
    got = quantize_problems("4bit", "cuda", offsets)
    assert len(got) == (1 if installed("bitsandbytes") else 2)  # and the missing library, named
    p = got[0]
    assert p.field == "model.quantize" and "flora" in p.constraint and "cannot hold a small offset" in p.constraint
    assert quantize_problems("none", "cpu", offsets) == []
    # on a CPU config, both reasons are reported at once
    ps = problems({"model": {"name": "tiny", "device": "cpu", "quantize": "8bit"}, "strategy": {"name": "flora"}})
    assert sum("model.quantize = '8bit'" in p for p in ps) >= 2 and any("flora" in p for p in ps)


def test_liger_kernels_on_a_cpu_are_refused_and_auto_keeps_transformers_kernels(tiny_cfg) -> None:
    (p,) = problems({"model": {"name": "tiny", "device": "cpu", "kernels": "liger"}})
    assert p.startswith("model.kernels = 'liger': ") and "Triton" in p and "model.kernels: auto" in p
    assert kernels_problems("auto", "cpu") == [] and kernels_problems("default", "cuda") == []

    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("model.device=cpu", "rounds=1")
    run_federated(cfg, progress=False)
    first = next(
        r for r in read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl") if r["round"] == 0 and r["client"] is None
    )
    assert first["kernels"] == "transformers" and first["base_dtype"] in ("float32", "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_trains_fp32_adapters_on_the_gpu(tiny_cfg, bits: str) -> None:
    pytest.importorskip("bitsandbytes", reason="the gpu extra: pip install 'fedtune[gpu]'")
    from fedtune.engines.inprocess import inprocess_federation
    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("model.device=cuda", f"model.quantize={bits}", "rounds=1", name=bits)
    fed = inprocess_federation(cfg)
    assert {p.dtype for p in fed.model.parameters() if p.requires_grad} == {torch.float32}
    run_federated(cfg, progress=False)
    records = read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl")
    first = next(r for r in records if r["round"] == 0 and r["client"] is None)
    assert first["base_dtype"] == {"4bit": "nf4", "8bit": "int8"}[bits] and first["device"].startswith("cuda")
    train = [r for r in records if r.get("round") == 1 and "train_loss" in r]
    assert train and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)


@pytest.mark.gpu
def test_liger_kernels_give_the_same_loss_on_the_gpu(tiny_cfg, no_time) -> None:
    pytest.importorskip("liger_kernel", reason="the gpu extra: pip install 'fedtune[gpu]'")
    from fedtune.recipes.federated import run_federated

    out = {}
    for kernels in ("default", "liger"):
        cfg = tiny_cfg(
            "model.device=cuda", f"model.kernels={kernels}", "model.dtype=float32", "train.bf16=false", name=kernels
        )
        run_federated(cfg, progress=False)
        out[kernels] = read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl")
    assert next(r for r in out["liger"] if r["round"] == 0 and r["client"] is None)["kernels"] == "liger"
    a = [r["global_loss"] for r in out["default"] if "global_loss" in r]
    b = [r["global_loss"] for r in out["liger"] if "global_loss" in r]
    assert a and b == pytest.approx(a, rel=1e-3)

"""`model.dtype` / `train.bf16` 'auto': bf16 only where the device runs it natively (asked of torch:
CPU capability, AVX512-BF16 / AMX, oneDNN), fp32 elsewhere and for strategies that write into the
base weights; the choice and its reason are in the round-0 record and on the console; an explicit
bf16 where it is emulated runs with a warning that measures the cost (validate and run)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from conftest import ROOT
from fedtune.models import precision
from fedtune.models.precision import choose_precision, cpu_bf16

CPU = torch.device("cpu")
NATIVE, EMULATED = (True, "native (test)"), (False, "CPU capability AVX2: no native bf16 (test)")


@pytest.mark.parametrize(
    ("capability", "instructions", "onednn", "native"),
    [
        ("AVX512", True, True, True),  # Sapphire Rapids (AMX), Cooper Lake / Zen 4 (AVX512-BF16)
        ("AVX2", True, True, False),  # ATEN_CPU_CAPABILITY=avx2, or an AVX2-only CPU
        ("AVX512", False, True, False),  # Skylake-X / Ice Lake: AVX512 without bf16 instructions
        ("AVX512", True, False, False),  # ONEDNN_MAX_CPU_ISA=AVX2: bf16 matmuls emulated
        ("DEFAULT", False, False, False),
    ],
)
def test_a_cpu_has_native_bf16_only_with_avx512_bf16_instructions_and_onednn(
    capability: str, instructions: bool, onednn: bool, native: bool
) -> None:
    ok, why = cpu_bf16(capability, instructions, onednn)
    assert ok is native and why


@pytest.mark.parametrize(("capability", "want"), [("AVX2", "float32"), ("AVX512", "bfloat16")])
def test_auto_follows_what_torch_reports_for_the_cpu(
    monkeypatch: pytest.MonkeyPatch, capability: str, want: str
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_has", lambda *features: True)
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)
    p = choose_precision("auto", "auto", CPU)
    assert (p.dtype, p.bf16, p.native) == (want, want == "bfloat16", want == "bfloat16")
    assert capability in p.reason and "(auto)" in p.reason


def test_aten_cpu_capability_avx2_makes_auto_pick_fp32_in_a_real_process() -> None:
    """No monkeypatching: torch itself reports AVX2 (whatever this CPU has)."""
    code = (
        "import torch; from fedtune.models.precision import choose_precision as c; "
        "p = c('auto', 'auto', torch.device('cpu')); print(torch.backends.cpu.get_cpu_capability(), p.dtype, p.bf16)"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["AVX2", "float32", "False"]


@pytest.mark.parametrize(
    ("dtype", "bf16", "native", "want"),
    [
        ("auto", "auto", NATIVE, ("bfloat16", True)),
        ("auto", "auto", EMULATED, ("float32", False)),
        ("auto", False, NATIVE, ("float32", False)),  # a bf16 base needs autocast: explicit false keeps fp32
        ("float32", "auto", NATIVE, ("float32", True)),  # autocast still speeds up the matmuls
        ("bfloat16", "auto", EMULATED, ("bfloat16", True)),  # explicit: kept (with a warning), autocast follows
        ("float32", True, EMULATED, ("float32", True)),
    ],
)
def test_explicit_values_are_kept_and_auto_is_resolved(dtype: str, bf16: Any, native: Any, want: Any) -> None:
    p = choose_precision(dtype, bf16, CPU, native=native)
    assert (p.dtype, p.bf16) == want
    assert p.slow == ((p.dtype == "bfloat16" or p.bf16) and not native[0])


def test_strategies_that_write_into_the_base_get_an_fp32_base_from_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.config import config_from_dict
    from fedtune.engines.federation import run_precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: NATIVE)
    for strategy in ({"name": "flora"}, {"name": "fedex_lora"}, {"name": "fedkseed", "full": True}):
        cfg = config_from_dict({"model": {"name": "tiny"}, "strategy": strategy})
        resolved, p, warning = run_precision(cfg)
        assert resolved.model.dtype == "float32" and p.bf16 and warning is None
        assert "writes offsets into the base weights" in p.reason, strategy
    resolved, p, _ = run_precision(config_from_dict({"model": {"name": "tiny"}}))
    assert (resolved.model.dtype, resolved.train.bf16) == ("bfloat16", True)


def test_explicit_bf16_where_it_is_emulated_warns_with_the_measured_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.config import config_from_dict
    from fedtune.engines.federation import run_precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: EMULATED)
    cfg = config_from_dict({"model": {"name": "tiny", "dtype": "bfloat16"}, "train": {"bf16": True}})
    resolved, p, warning = run_precision(cfg)
    assert (resolved.model.dtype, resolved.train.bf16) == ("bfloat16", True)  # it still runs as asked
    assert warning is not None and "GFLOP/s" in warning and "fp32" in warning
    assert run_precision(config_from_dict({"model": {"name": "tiny"}}))[2] is None  # auto: nothing to warn about


def test_validate_warns_but_passes_on_a_cpu_without_native_bf16() -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "COLUMNS": "400"}
    args = ["validate", "configs/tiny.yaml", "--no-data", "--set", "model.device=cpu"]
    args += ["--set", "model.dtype=bfloat16", "--set", "train.bf16=true"]
    out = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "precision here: bf16 base, bf16 autocast on on cpu: CPU capability AVX2" in out.stdout
    assert "warning" in out.stderr and "GFLOP/s" in out.stderr


@pytest.mark.parametrize("native", [NATIVE, EMULATED], ids=["native", "emulated"])
def test_the_choice_and_its_reason_are_in_the_round0_record_and_on_the_console(
    tiny_cfg: Any, monkeypatch: pytest.MonkeyPatch, native: Any
) -> None:
    from fedtune.engines.inprocess import inprocess_federation
    from fedtune.report.summary import setup_lines

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    fed = inprocess_federation(tiny_cfg("model.dtype=auto", "train.bf16=auto", "model.device=cpu"))
    r0 = fed.round0
    assert r0["base_dtype"] == ("bfloat16" if native[0] else "float32") and r0["bf16_autocast"] is native[0]
    assert r0["precision"].endswith(native[1]) and "precision_warning" not in r0
    assert fed.engine.plan.spec.bf16 is native[0]
    assert setup_lines(r0, None)[0] == f"device cpu: {r0['precision']}"


def test_defaults_are_auto_and_every_shipped_config_loads() -> None:
    from fedtune.config import ExperimentConfig, load_config
    from fedtune.models.attention import kernel_for

    cfg = ExperimentConfig()
    assert (cfg.model.dtype, cfg.train.bf16) == ("auto", "auto")
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert (demo.model.dtype, demo.train.bf16, demo.model.attention) == ("auto", "auto", "auto")
    assert (kernel_for("auto", "cpu"), kernel_for("auto", "cuda"), kernel_for("eager", "cuda")) == (
        "grouped",
        "default",
        "eager",
    )
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(("native", "want"), [(EMULATED, False), (NATIVE, True)])
def test_trust_distill_parties_train_in_the_precision_auto_chose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, native: Any, want: bool
) -> None:
    """Each trust_distill party's own model and local step resolve 'auto' for the device, as the
    engine's model does. They used to get the unresolved config: `train.bf16: auto` reached the
    step as the string 'auto', which is truthy, so every party trained under bf16 autocast even
    where bf16 is emulated (the demo's SmolLM2 rows on an AVX2 CPU: about 100x slower matmuls)."""
    from fedtune.config.load import load_config
    from fedtune.engines import parties
    from fedtune.recipes.federated import run_federated

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    seen: list[Any] = []
    step = parties.train_party_

    def spy(model: Any, shard: Any, public: Any, target: Any, spec: Any, weight: float, gen: Any) -> Any:
        seen.append((spec.bf16, next(p for p in model.parameters() if not p.requires_grad).dtype))
        return step(model, shard, public, target, spec, weight, gen)

    monkeypatch.setattr(parties, "train_party_", spy)
    over = ["model.dtype=auto", "train.bf16=auto", "rounds=1", "train.steps=1", "evaluation.every=5"]
    cfg = load_config(ROOT / "configs" / "tiny-trust-distill.yaml", [*over, f"output_dir={tmp_path}"])
    run_federated(cfg, progress=False)
    base = torch.bfloat16 if want else torch.float32
    assert seen and all(s == (want, base) for s in seen), seen


def test_a_train_spec_refuses_an_unresolved_bf16() -> None:
    from fedtune.client.train import TrainSpec

    with pytest.raises(TypeError, match="run_precision"):
        TrainSpec(bf16="auto")  # type: ignore[arg-type]

"""model.device and model.dtype: checked before any weights load, recorded in every run, and the
bf16 base keeps fp32 adapters (master weights) that train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedtune.adapters import ADAPTERS
from fedtune.config import config_from_dict
from fedtune.errors import ConfigError
from fedtune.report.io import read_jsonl


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return [str(p) for p in e.value.problems]


def test_a_missing_gpu_is_refused_by_name() -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
    (p,) = problems({"model": {"name": "tiny", "device": missing}})
    assert p.startswith(f"model.device = '{missing}': ") and "CUDA device" in p and "auto" in p


def test_a_bad_device_string_is_refused() -> None:
    (p,) = problems({"model": {"name": "tiny", "device": "gpu"}})
    assert p.startswith("model.device = 'gpu'")


def test_a_bf16_base_needs_autocast_and_an_fp32_base_for_merging_strategies() -> None:
    (p,) = problems({"model": {"name": "tiny", "dtype": "bfloat16"}, "train": {"bf16": False}})
    assert "train.bf16: true" in p
    config_from_dict({"model": {"name": "tiny", "dtype": "bfloat16"}})  # train.bf16: auto turns autocast on
    bf16 = {"model": {"name": "tiny", "dtype": "bfloat16"}, "train": {"bf16": True}}
    ps = problems({**bf16, "strategy": {"name": "flora"}})
    assert len(ps) == 1 and "writes offsets into the base weights" in ps[0]
    full = {"name": "fedkseed", "full": True}
    assert problems({**bf16, "strategy": full})
    config_from_dict(bf16)  # fedavg: fine


def test_a_bf16_base_trains_fp32_adapters_and_the_run_records_where_it_ran(tiny_cfg) -> None:
    from fedtune.client.train import model_device
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
    assert first["device"] == str(model_device(fed.model)) and first["base_dtype"] == "bfloat16"
    train = [r for r in records if r.get("round") == 1 and "train_loss" in r]
    assert train and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)


@pytest.mark.gpu
def test_the_same_run_on_the_gpu_matches_the_cpu(tiny_cfg, no_time) -> None:
    from fedtune.recipes.federated import run_federated

    out = {}
    for dev in ("cpu", "cuda"):
        cfg = tiny_cfg(f"model.device={dev}", "model.dtype=float32", "train.bf16=false", name=dev)  # fp32 on both
        run_federated(cfg, progress=False)
        out[dev] = [r for r in read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl") if "global_loss" in r]
    for a, b in zip(out["cpu"], out["cuda"]):
        assert a["global_loss"] == pytest.approx(b["global_loss"], rel=1e-3)


class RoundTrips(TorchDispatchMode):
    """Counts tensors cast bf16 -> fp32 and then straight back to bf16 (what autocast does to an
    activation someone cast to fp32 before a matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.upcast: list[torch.Tensor] = []  # kept alive, so their ids stay unique
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0].dtype, kwargs.get("dtype")
            if src == torch.bfloat16 and dst == torch.float32:
                self.upcast.append(out)
            elif src == torch.float32 and dst == torch.bfloat16:
                self.count += any(args[0] is t for t in self.upcast)
        return out


@pytest.mark.parametrize("kind", ["lora", "moe_lora", "lora_sb"])
def test_bf16_adapters_take_the_bf16_activations_without_an_fp32_round_trip(tiny_cfg, kind: str) -> None:
    """Under bf16 autocast the adapters' matmuls run in bf16 whatever their inputs' dtype; casting
    each adapted layer's bf16 input to the fp32 adapter's dtype first (PEFT's default, and our
    adapters' before) had autocast cast it straight back: two copies of every adapted activation for
    nothing. None is left, and for PEFT's LoRA the gradients equal those of its own cast (exact)."""
    from fedtune.client.train import lm_loss, model_device
    from fedtune.engines.inprocess import inprocess_federation

    cfg = tiny_cfg("model.dtype=bfloat16", "train.bf16=true", f"adapter.kind={kind}", "rounds=1")
    model = inprocess_federation(cfg).model
    dev = model_device(model)  # the CPU, or the GPU where there is one
    batch = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    with RoundTrips() as trips:
        loss = lm_loss(model, batch, True)
        loss.backward()
    assert trips.upcast, "the bf16 forward upcast nothing (RMSNorm does): the counter sees no casts"
    assert trips.count == 0
    if kind != "lora":
        return
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with RoundTrips() as trips, torch.autocast(dev.type, dtype=torch.bfloat16):  # PEFT casting its inputs, as before
        model(input_ids=batch, labels=batch).loss.backward()
    assert trips.count > 0  # the counter sees the round trips this removes
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ours[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_every_adapter_kind_runs_on_a_bf16_base_under_bf16_autocast(tiny_cfg, kind: str) -> None:
    """What `auto` picks where bf16 is native (CUDA, AVX512-BF16 / AMX CPUs). Two defects it caught on
    SmolLM2 (bench/adapters.py): PEFT's `disable_input_dtype_casting` raised AttributeError on IA3 and
    VeRA layers (they never set `cast_input_dtype_enabled`), and VeRA's frozen A, B took the bf16
    base's dtype, so the warm-up forward (no autocast) met fp32 input and a bf16 A."""
    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("model.dtype=bfloat16", "train.bf16=true", f"adapter.kind={kind}", "rounds=1", "train.steps=1")
    run_federated(cfg, progress=False)
    records = read_jsonl(Path(cfg.run_dir()) / "metrics.jsonl")
    train = [r for r in records if r.get("round") == 1 and "train_loss" in r]
    assert train and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)
    final = next(r for r in records if r["round"] == 1 and r["client"] is None)
    assert torch.isfinite(torch.tensor(final["mean_ppl"]))

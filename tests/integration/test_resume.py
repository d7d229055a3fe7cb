"""An interrupted run, resumed, ends with the same numbers as an uninterrupted one."""

from pathlib import Path

import pytest

from fedtune.errors import TrainingDivergedError
from fedtune.recipes.federated import run_federated
from fedtune.report import io


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_resume_equals_uninterrupted(tiny_cfg, interrupt_after, no_time, strategy: str) -> None:
    over = (f"strategy.name={strategy}", "rounds=3", "train.steps=3")
    full = run_federated(tiny_cfg(*over, name="full"), progress=False)

    cfg = tiny_cfg(*over, name="cut")
    interrupt_after(cfg, 1)
    assert io.load_checkpoint(full.run_dir.parent / "cut" / io.CHECKPOINT)["round"] == 1
    assert not (full.run_dir.parent / "cut" / io.SUMMARY).exists()

    resumed = run_federated(cfg, resume=True, progress=False)
    assert no_time(resumed.records) == no_time(full.records)
    assert io.read_jsonl(resumed.run_dir / io.METRICS) == resumed.records


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, monkeypatch) -> None:
    import torch

    import fedtune.client.train as train

    real = train.lm_loss
    calls = {"n": 0}

    def nan_in_round_2(model, batch, *args):
        calls["n"] += 1
        loss = real(model, batch, *args)
        return loss * torch.nan if calls["n"] > 4 * 4 else loss  # 4 clients x 4 steps = round 1

    monkeypatch.setattr(train, "lm_loss", nan_in_round_2)
    cfg = tiny_cfg("rounds=3", name="nan")
    with pytest.raises(TrainingDivergedError, match=r"round 2: loss is nan .* Rounds 1-1 are kept .* start a new run"):
        run_federated(cfg, progress=False)
    run_dir = Path(cfg.run_dir())
    assert io.load_checkpoint(run_dir / io.CHECKPOINT)["round"] == 1
    assert max(r["round"] for r in io.read_jsonl(run_dir / io.METRICS)) == 1


def test_ffa_moves_only_b_and_fedit_logs_its_error(tiny_cfg) -> None:
    import torch

    from fedtune.codecs import make_codec
    from fedtune.strategies.lora_math import B_SUFFIX

    def wire(state: dict) -> int:  # the identity codec's payload: safetensors of the fp32 tensors
        return len(make_codec("identity").encode(state, None, torch.Generator())[0])

    runs = {s: run_federated(tiny_cfg(f"strategy.name={s}", name=s), progress=False) for s in ("fedit", "ffa_lora")}
    ckpt = io.load_checkpoint(runs["fedit"].run_dir / io.CHECKPOINT)
    full = ckpt["global"]
    only_b = {k: v for k, v in full.items() if k.endswith(B_SUFFIX)}
    for name, expected in (("fedit", full), ("ffa_lora", only_b)):
        recs = [r for r in runs[name].records if r["client"] and r["round"] == 1]
        # bytes per client per direction = the serialized fp32 tensors it sends: 4 bytes a parameter + header
        assert {r["bytes_up"] for r in recs} == {wire(expected)}
        assert {r["bytes_down"] for r in recs} == {wire(expected)}
    n_b = sum(v.numel() for v in only_b.values())
    n_all = sum(v.numel() for v in full.values())
    assert 4 * n_b < wire(only_b) < 4 * n_b + 1024 and n_b < n_all
    summary = [r for r in runs["fedit"].records if r["client"] is None and r["round"] >= 1]
    assert all(0 < r["agg_error"] < 1 for r in summary)

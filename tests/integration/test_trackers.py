"""report.trackers: TensorBoard event files and a local MLflow store, read back, hold exactly the
numbers of metrics.jsonl; a resumed run continues its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def summaries(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in recs if r["client"] is None}


def test_tensorboard_and_mlflow_hold_every_round_and_a_resume_continues_the_run(
    tiny_cfg, tmp_path, interrupt_after
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedtune.recipes.federated import run_federated

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = tiny_cfg("report.trackers=[tensorboard, mlflow]", f"report.mlflow_uri={uri}", "rounds=3")
    interrupt_after(cfg, 1)
    run_id = json.loads((Path(cfg.run_dir()) / "trackers.json").read_text())["mlflow_run_id"]
    run_federated(cfg, resume=True, progress=False)
    run_dir = Path(cfg.run_dir())
    rounds = summaries(run_dir)
    assert sorted(rounds) == [0, 1, 2, 3]

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"  # the resumed run is the same run
    history = {m.step: m.value for m in client.get_metric_history(run_id, "mean_ppl")}
    assert history == pytest.approx({r: rounds[r]["mean_ppl"] for r in rounds})
    assert run.data.params["train.lr"] == "0.005" and run.data.params["strategy.name"] == "fedavg"
    a_client = next(k for k in run.data.metrics if k.startswith("client/") and k.endswith("/global_loss"))
    assert a_client
    plots = {Path(a.path).name for a in client.list_artifacts(run_id, "plots")}
    assert plots and plots == {p.name for p in (run_dir / "plots").iterdir()}

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("mean_ppl")}
    assert tb == pytest.approx({r: rounds[r]["mean_ppl"] for r in rounds}, rel=1e-6)  # float32 in the events
    assert events.Tags()["images"]  # the plots


def test_a_tracker_without_its_package_is_refused_before_training(monkeypatch) -> None:
    import importlib.util

    from fedtune.config import config_from_dict
    from fedtune.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"name": "tiny"}, "report": {"trackers": ["mlflow"]}})
    (p,) = e.value.problems
    assert str(p).startswith("report.trackers = ['mlflow']") and "fedtune[track]" in str(p)

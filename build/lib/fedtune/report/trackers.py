"""Optional experiment trackers (`report.trackers`, extra `fedtune[track]`): every round's records
as scalars, the config as parameters, the plots as artifacts.

    tensorboard  event files in RUN_DIR/tensorboard (torch's SummaryWriter); `tensorboard --logdir runs`
    mlflow       one MLflow run per fedtune run, through MlflowClient (no global active run); the
                 store is report.mlflow_uri, default a SQLite database beside the runs
                 (OUTPUT_PARENT/mlflow.db, artifacts in OUTPUT_PARENT/mlartifacts): MLflow 3 keeps
                 its plain-file store in maintenance mode, SQLite is its recommended local store.

Step = round. Round summaries log as `<metric>`, client records as `client/<id>/<metric>`; only
numbers are logged (texts such as generation samples stay in metrics.jsonl). A resumed run logs
to the same MLflow run (its id is kept in RUN_DIR/trackers.json) and appends TensorBoard event
files; a round that was logged but not checkpointed before a crash is logged again on resume
(both values stay visible in the tracker; metrics.jsonl keeps only the checkpointed one).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, rnd: int, summary: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> None: ...

    def finish(self, plots: Path, status: str) -> None: ...


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric fields of a record (booleans and ids excluded), names made tracker-safe."""
    out = {}
    for k, v in record.items():
        if k in ("round", "client") or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[prefix + re.sub(r"[^\w\-. /]", "_", k)] = float(v)
    return out


def round_scalars(summary: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out = scalars(summary)
    for r in clients:
        cid = re.sub(r"[^\w\-.]", "_", str(r["client"]))
        out.update(scalars(r, f"client/{cid}/"))
    return out


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as dotted key -> value strings (MLflow params; values cut to 500 characters)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v)[:500] if not isinstance(v, str) else v[:500]
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)

    def log(self, rnd: int, summary: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> None:
        for k, v in round_scalars(summary, clients).items():
            self.writer.add_scalar(k, v, rnd)
        self.writer.flush()

    def finish(self, plots: Path, status: str) -> None:
        import matplotlib.image

        for png in sorted(plots.glob("*.png")):
            self.writer.add_image(f"plots/{png.stem}", matplotlib.image.imread(png)[..., :3], 0, dataformats="HWC")
        self.writer.add_text("status", status, 0)
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], uri: str, experiment: str, run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        state = _read_state(run_dir)
        if "mlflow_run_id" in state:  # a resumed run continues its MLflow run
            self.run_id = str(state["mlflow_run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            exp_id = found.experiment_id
        else:
            artifacts = Path(run_dir).resolve().parent / "mlartifacts"
            exp_id = self.client.create_experiment(experiment, artifact_location=artifacts.as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        _write_state(run_dir, {**state, "mlflow_run_id": self.run_id, "mlflow_uri": uri})
        params = [Param(k, v) for k, v in sorted(flat_params(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, rnd: int, summary: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, rnd) for k, v in sorted(round_scalars(summary, clients).items())]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, plots: Path, status: str) -> None:
        if plots.is_dir():
            self.client.log_artifacts(self.run_id, str(plots), "plots")
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "complete" else "FAILED")


def default_mlflow_uri(run_dir: Path) -> str:
    return "sqlite:///" + str(Path(run_dir).resolve().parent / "mlflow.db")


def open_trackers(
    names: Sequence[str], run_dir: Path, config: Mapping[str, Any], uri: str | None, experiment: str, run_name: str
) -> list[Tracker]:
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker(run_dir, config))
        elif name == "mlflow":
            out.append(MlflowTracker(run_dir, config, uri or default_mlflow_uri(run_dir), experiment, run_name))
    return out


def _read_state(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / STATE_FILE
    return dict(json.loads(f.read_text())) if f.exists() else {}


def _write_state(run_dir: Path, state: Mapping[str, Any]) -> None:
    from fedtune.files import write_atomic

    write_atomic(Path(run_dir) / STATE_FILE, json.dumps(dict(state), sort_keys=True))

"""End to end through the CLI on the tiny model (a few seconds each)."""

import json
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


fedtune = run_cli


# the module-scoped runs below are made once: under pytest-xdist every worker that takes one of
# this module's tests would otherwise make them again
pytestmark = pytest.mark.xdist_group("cli-runs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for strategy in ("fedavg", "local", "centralized"):
        d = base / strategy
        quiet = ["--no-progress"] if strategy != "fedavg" else []  # fedavg: the batch-job round lines
        r = fedtune("run", TINY, *quiet, "--set", f"output_dir={d}", "--set", f"strategy.name={strategy}")
        assert r.returncode == 0, r.stderr
        out[strategy] = d
        (d / "stderr.txt").write_text(r.stderr)
    return out


def records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_plots_and_peft_adapters(runs) -> None:
    d = runs["fedavg"]
    recs = records(d)
    clients = sorted({r["client"] for r in recs if r["client"]})
    assert clients == ["email", "http", "json", "logging"]
    # one record per round and client, plus a round summary, for rounds 0..2
    assert len(recs) == 3 * (len(clients) + 1)
    last = [r for r in recs if r["round"] == 2 and r["client"]]
    for r in last:
        assert r["bytes_up"] > 0 and r["bytes_down"] == r["bytes_up"]  # fp32 both ways, same keys
        assert r["test_ppl"] > 1 and r["train_seconds"] > 0
    base = {r["client"]: r["test_ppl"] for r in recs if r["round"] == 0 and r["client"]}
    assert all(r["test_ppl"] < base[r["client"]] for r in last)  # federated training helped everyone
    assert (d / "plots" / "loss.png").stat().st_size > 10_000
    assert (d / "plots" / "bytes.png").stat().st_size > 5_000
    assert (d / "adapters" / "global" / "adapter_model.safetensors").exists()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "complete"
    # stderr is not a terminal: one line per round with what the round measured, no progress bars
    lines = [x for x in (d / "stderr.txt").read_text().splitlines() if x.startswith("round ")]
    assert [x.split(",")[0] for x in lines] == ["round 1/2", "round 2/2"]
    round2 = next(r for r in recs if r["round"] == 2 and r["client"] is None)
    assert f"train loss {round2['train_loss']:.3f}" in lines[1] and f"mean ppl {round2['mean_ppl']:.3f}" in lines[1]


def test_base_perplexity_is_pinned(runs) -> None:
    # Round 0 is the untouched tiny base model (seed 0) on the stdlib corpus: a reference number.
    r0 = next(r for r in records(runs["fedavg"]) if r["round"] == 0 and r["client"] is None)
    assert r0["mean_ppl"] == pytest.approx(310.20, rel=2e-3)


def test_local_exports_one_adapter_per_client_and_no_bytes_move(runs) -> None:
    d = runs["local"]
    assert sorted(p.name for p in (d / "adapters").iterdir()) == ["email", "http", "json", "logging"]
    last = [r for r in records(d) if r["round"] == 2 and r["client"]]
    assert all("personal_ppl" in r and "global_ppl" not in r for r in last)
    assert all(r.get("bytes_up", 0) == 0 and r.get("bytes_down", 0) == 0 for r in records(d) if r["client"])
    assert [r["cum_bytes"] for r in records(d) if r["client"] is None] == [0, 0, 0]


def test_centralized_counts_the_raw_data_it_collects(runs) -> None:
    rounds = [r for r in records(runs["centralized"]) if r["client"] is None]
    assert rounds[1]["bytes_up"] > 0 and rounds[1]["bytes_down"] == 0  # the raw tokens, once
    assert rounds[2]["bytes_up"] == 0 and rounds[2]["cum_bytes"] == rounds[1]["cum_bytes"]


def test_report_puts_runs_side_by_side(runs, tmp_path) -> None:
    r = fedtune("report", *(str(d) for d in runs.values()), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "final test perplexity per client" in r.stdout
    assert all(name in r.stdout for name in ("fedavg", "local", "centralized"))
    assert (tmp_path / "loss.png").exists()


def test_errors_are_clear_and_without_traceback(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 0\ntrain: {lr: -1, stepz: 2}\n")
    r = fedtune("validate", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "3 problems" in r.stderr and "train.stepz" in r.stderr and "rounds = 0" in r.stderr

    r = fedtune(
        "run",
        TINY,
        "--set",
        "partition.kind=iid",
        "--set",
        "partition.num_clients=5000",
        "--set",
        f"output_dir={tmp_path / 'x'}",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "more than the" in r.stderr and "documents available" in r.stderr

    r = fedtune("run", TINY, "--set", "data.source=files", "--set", "data.path=/no/such/file.jsonl")
    assert r.returncode == 2 and "data.path = '/no/such/file.jsonl': does not exist" in r.stderr


def test_existing_run_dir_is_not_overwritten_silently(runs) -> None:
    r = fedtune("run", TINY, "--set", f"output_dir={runs['fedavg']}")
    assert r.returncode == 2 and "--resume" in r.stderr


def test_validate_runs_every_check_run_does_for_several_configs(tmp_path) -> None:
    """The landed `validate` passed all of these; `run` then failed on them."""
    import yaml

    cases = {
        "ranks.yaml": {"strategy": {"name": "flora"}, "adapter": {"ranks": [2, 4]}},  # 2 ranks for 4 clients
        "long.yaml": {"data": {"block_size": 4096}},  # above the tiny model's 2048 positions
        "dirichlet.yaml": {"partition": {"kind": "dirichlet", "num_clients": 12, "alpha": 1.0, "min_docs": 1}},
        "ok.yaml": {"rounds": 1},
    }
    paths = []
    for name, extra in cases.items():
        raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        for key, value in extra.items():  # each section updated in place (a repeated YAML key is refused)
            raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
        p = tmp_path / name
        p.write_text(yaml.safe_dump(raw))
        paths.append(str(p))
    r = fedtune("validate", *paths)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "one rank per client is needed; there are 4 clients" in r.stderr
    assert "at most 2048 positions" in r.stderr
    assert "document(s); it needs >= 2" in r.stderr  # a Dirichlet client with a single document
    assert "ok:" in r.stdout and "ok.yaml" in r.stdout

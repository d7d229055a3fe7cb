"""Run directories a user can always get out of: running / failed (with error.log and what to
do) / complete; config and data errors leave no directory; a crash before round 1 is simply rerun;
resume refuses overrides that change the experiment; files follow the umask; a kill during the
checkpoint write resumes to the same numbers. Each case failed or was silent on the landed code."""

import json
import os
import stat
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.recipes.federated import run_federated
from fedtune.report import io


def test_a_data_error_leaves_no_run_directory(tiny_cfg, tmp_path) -> None:
    data = tmp_path / "clients"
    (data / "a").mkdir(parents=True)
    (data / "a" / "1.txt").write_text("one")
    (data / "a" / "2.txt").write_text("two")
    (data / "empty").mkdir()
    cfg = tiny_cfg("data.source=files", f"data.path={data}", "data.labels=null", name="bad-data")
    with pytest.raises(FedtuneError, match="empty has no documents"):
        run_federated(cfg, progress=False)
    assert not Path(cfg.run_dir()).exists()  # the landed code left an empty run dir behind


def test_a_crash_before_round_1_is_rerun_and_after_round_1_resumed(tiny_cfg, interrupt_after, monkeypatch) -> None:
    from fedtune.engines.inprocess import InProcessEngine

    cfg = tiny_cfg("rounds=2", "train.steps=1", name="crash")
    real = InProcessEngine.run
    monkeypatch.setattr(InProcessEngine, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        run_federated(cfg, progress=False)
    d = Path(cfg.run_dir())
    status = io.read_status(d)
    assert status["state"] == "failed" and "disk full" in status["error"] and "run the same command" in status["fix"]
    assert "RuntimeError: disk full" in (d / io.ERROR_LOG).read_text()
    monkeypatch.setattr(InProcessEngine, "run", real)
    run_federated(cfg, progress=False)  # no --overwrite needed: nothing had been trained
    assert io.read_status(d)["state"] == "complete"

    cut = tiny_cfg("rounds=2", "train.steps=1", name="cut")
    interrupt_after(cut, 1)
    status = io.read_status(Path(cut.run_dir()))
    assert status["state"] == "failed" and "--resume" in status["fix"]
    with pytest.raises(FedtuneError, match="failed"):
        run_federated(cut, progress=False)  # a started run is never silently restarted
    assert run_federated(cut, resume=True, progress=False).final_round == 2


def test_a_kill_during_the_checkpoint_write_resumes_to_the_same_numbers(tiny_cfg, no_time, monkeypatch) -> None:
    """The write is atomic (temp file, fsync, rename): the old checkpoint survives, the metrics of
    the round that was never checkpointed are dropped on resume, the torn temp file is removed."""
    import fedtune.files as files

    over = ("rounds=3", "train.steps=2")
    full = run_federated(tiny_cfg(*over, name="whole"), progress=False)
    cfg = tiny_cfg(*over, name="torn")
    real, calls = files.write_atomic_with, {"n": 0}

    def torn(path, write):
        if path.name == io.CHECKPOINT:
            calls["n"] += 1
            if calls["n"] == 2:  # round 2's checkpoint: half written, then the process dies
                tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
                tmp.write_bytes(b"half a checkpoint")
                raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(files, "write_atomic_with", torn)
    monkeypatch.setattr(io, "write_atomic_with", torn)
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, progress=False)
    d = Path(cfg.run_dir())
    assert io.load_checkpoint(d / io.CHECKPOINT)["round"] == 1 and list(d.glob(".*.tmp-*"))
    monkeypatch.undo()
    resumed = run_federated(cfg, resume=True, progress=False)
    assert no_time(resumed.records) == no_time(full.records)
    assert not list(d.glob(".*.tmp-*"))


def test_resume_refuses_overrides_that_change_the_experiment(tiny_cfg) -> None:
    from typer.testing import CliRunner

    from fedtune.cli import app

    cfg = tiny_cfg("rounds=1", "train.steps=1", name="short")
    run_federated(cfg, progress=False)
    runner = CliRunner()
    d = cfg.run_dir()
    r = runner.invoke(
        app, ["run", "--resume", d, "--no-progress", "--set", "train.lr=0.1", "--set", "strategy.name=local"]
    )
    assert r.exit_code == 2 and "strategy.name, train.lr" in r.output and "cannot change" in r.output
    r = runner.invoke(app, ["run", "--resume", d, "--no-progress", "--set", "rounds=2"])
    assert r.exit_code == 0, r.output
    assert "# resumed after round 1 with: rounds=2" in (Path(d) / io.CONFIG).read_text()
    assert max(x["round"] for x in io.read_jsonl(Path(d) / io.METRICS)) == 2


def test_unexpected_errors_are_short_and_point_to_the_full_traceback(tiny_cfg, monkeypatch) -> None:
    from typer.testing import CliRunner

    import fedtune.recipes.federated as recipe
    from fedtune.cli import app

    def boom(cfg, **kw):
        big = list(range(100_000))  # a local that a pretty traceback would print
        raise RuntimeError(f"boom after {len(big)} items")

    monkeypatch.setattr(recipe, "run_federated", boom)
    cfg = tiny_cfg(name="boom")
    r = CliRunner().invoke(app, ["run", "configs/tiny.yaml", "--no-progress", "--set", f"output_dir={cfg.run_dir()}"])
    assert r.exit_code == 1 and "RuntimeError: boom after 100000 items" in r.output
    assert "full traceback:" in r.output and len(r.output.splitlines()) < 30 and "99999" not in r.output


def test_run_files_follow_the_umask(tiny_cfg) -> None:
    """The landed code made checkpoint, metrics and adapters 0600 / 0700 (mkstemp, mkdtemp)."""
    old = os.umask(0o022)
    try:
        run = run_federated(tiny_cfg("rounds=1", "train.steps=1", name="shared"), progress=False)
    finally:
        os.umask(old)
    for p in [run.run_dir / io.CHECKPOINT, run.run_dir / io.CONFIG, run.run_dir / "adapters" / "global"]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))  # group and others can read
    assert json.loads((run.run_dir / io.STATUS).read_text())["state"] == "complete"


def test_reported_wall_time_is_the_whole_run_split_into_its_parts(tiny_cfg) -> None:
    """The landed summary's wall excluded set-up and evaluation (2.9 s reported for a 158.8 s
    run). Now: summary wall = the whole run, >= set-up + rounds; each round is split into train,
    aggregate and eval seconds (+ records/checkpoint I/O in total); warm-up is reported apart."""
    import time

    t0 = time.perf_counter()
    run = run_federated(tiny_cfg("rounds=2", "train.steps=1", name="clock"), progress=False)
    elapsed = time.perf_counter() - t0
    s = json.loads((run.run_dir / io.SUMMARY).read_text())
    rounds = [r for r in run.records if r["client"] is None and r["round"] > 0]
    r0 = next(r for r in run.records if r["client"] is None and r["round"] == 0)
    assert s["setup_seconds"] == r0["setup_seconds"] > 0 and r0["warmup_seconds"] > 0
    assert s["round_seconds"] + s["setup_seconds"] <= s["wall_seconds"] <= elapsed
    for r in rounds:
        parts = r["train_seconds"] + r["aggregate_seconds"] + r["eval_seconds"]
        assert 0 < parts <= r["wall_seconds"]
    assert s["io_seconds"] > 0 and s["train_seconds"] == sum(r["train_seconds"] for r in rounds)


def test_evaluation_samples_a_fixed_seeded_set_of_clients(tiny_cfg) -> None:
    """evaluation.clients: the same seeded sample is scored at every evaluation, plus each round's
    trainers; records exist only for clients that were sampled or evaluated."""
    over = ("partition.kind=iid", "partition.num_clients=12", "sampling.fraction=0.25", "evaluation.clients=3")
    run = run_federated(tiny_cfg(*over, "rounds=2", "train.steps=1", name="many"), progress=False)
    watched = {r["client"] for r in run.records if r["round"] == 0 and r["client"]}
    assert len(watched) == 3
    for rnd in (1, 2):
        recs = [r for r in run.records if r["round"] == rnd and r["client"]]
        trainers = {r["client"] for r in recs if r["sampled"]}
        assert len(trainers) == 3
        assert {r["client"] for r in recs} == {r["client"] for r in recs if "test_ppl" in r} == watched | trainers


def test_past_ten_clients_the_table_lists_the_worst_and_the_plot_shows_a_band(tmp_path) -> None:
    from rich.console import Console

    from fedtune.report.plots import plot_runs
    from fedtune.report.summary import run_table

    recs = []
    for rnd in (0, 1):
        for i in range(12):
            recs.append(
                {"round": rnd, "client": f"c{i:02d}", "test_ppl": 100.0 + i - 10 * rnd, "test_loss": 4.0 + i / 10}
            )
        recs.append({"round": rnd, "client": None, "mean_ppl": 105.0, "cum_bytes": 0})
    text = Console(width=200, record=True)
    text.print(run_table("many", recs))
    out = text.export_text()
    assert "5 worst of 12 clients" in out and "c11" in out and "c00 " not in out
    loss, _ = plot_runs({"many": recs}, tmp_path)
    assert loss.stat().st_size > 5_000


def test_eval_all_scores_every_client_as_the_loop_did(tiny_cfg) -> None:
    """The loop scores a seeded sample (evaluation.clients) plus the trainers; `fedtune eval --all`
    scores every client, and where both scored one its numbers are the loop's."""
    import json

    from conftest import run_cli
    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("evaluation.clients=1", "sampling.fraction=0.25", "rounds=1")
    run_federated(cfg, progress=False)
    run = Path(cfg.run_dir())
    loop = {
        r["client"]: r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["round"] == 1 and r["client"] and "test_ppl" in r
    }
    r = run_cli("eval", str(run), "--all")
    assert r.returncode == 0, r.stderr
    every = [json.loads(x) for x in (run / "eval" / "all-clients.jsonl").read_text().splitlines()]
    assert sorted(x["client"] for x in every) == ["email", "http", "json", "logging"]
    assert 1 <= len(loop) < 4  # the loop scored only some of them
    for x in every:
        if x["client"] in loop:
            assert x["test_ppl"] == pytest.approx(loop[x["client"]]["test_ppl"], rel=1e-6)
    assert "4 clients: mean ppl" in r.stdout


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_cfg, tmp_path) -> None:
    """--overwrite replaces a run, never a user's folder (it deleted any folder before); an
    output_dir that is a file is named (it crashed twice)."""
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("important")
    cfg = tiny_cfg(f"output_dir={folder}", name="x")
    for overwrite in (False, True):
        with pytest.raises(FedtuneError, match="holds no fedtune run"):
            run_federated(cfg, progress=False, overwrite=overwrite)
    assert (folder / "thesis.txt").read_text() == "important" and len(list(folder.iterdir())) == 1
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FedtuneError, match="is a file"):
        run_federated(tiny_cfg(f"output_dir={tmp_path / 'afile'}", name="y"), progress=False)


def test_resume_cannot_shrink_the_rounds_already_done(tiny_cfg) -> None:
    from typer.testing import CliRunner

    from fedtune.cli import app

    cfg = tiny_cfg("rounds=2", "train.steps=1", name="two")
    run_federated(cfg, progress=False)
    before = (Path(cfg.run_dir()) / io.CONFIG).read_text()
    r = CliRunner().invoke(app, ["run", "--resume", cfg.run_dir(), "--no-progress", "--set", "rounds=1"])
    assert r.exit_code != 0 and "already done 2 rounds" in " ".join(r.output.split())
    assert (Path(cfg.run_dir()) / io.CONFIG).read_text() == before  # it rewrote config.yaml to rounds: 1


def test_a_divergence_in_round_1_says_nothing_is_kept(tiny_cfg, monkeypatch) -> None:
    """Round 1's divergence promised a round-0 checkpoint that does not exist (the directory is
    removed) and a `--resume --set train.lr` that resume refuses."""
    import torch

    import fedtune.client.train as train
    from fedtune.errors import TrainingDivergedError

    real = train.lm_loss
    monkeypatch.setattr(train, "lm_loss", lambda model, batch, *args: real(model, batch, *args) * torch.nan)
    cfg = tiny_cfg("rounds=1", name="diverged")
    with pytest.raises(TrainingDivergedError) as e:
        run_federated(cfg, progress=False)
    assert "nothing was trained, so nothing is kept" in str(e.value) and "--resume" not in str(e.value)
    assert not Path(cfg.run_dir()).exists()


def test_a_cut_last_record_is_not_read_and_damage_is_named(tmp_path) -> None:
    """A crash during an append leaves a last line without its newline: not a record (`fedtune
    report` died on it with a JSONDecodeError traceback). A bad line elsewhere, or a damaged
    checkpoint, is named by file (a checkpoint: "unexpected error (a bug)" before)."""
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert io.read_jsonl(f) == [{"round": 0}, {"round": 1}]
    f.write_text('{"round": 0}\n{"rou\n{"round": 1}\n')
    with pytest.raises(FedtuneError, match="metrics.jsonl line 2 is not JSON"):
        io.read_jsonl(f)
    ckpt = tmp_path / io.CHECKPOINT
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FedtuneError, match="cannot be read .* the file is damaged"):
        io.load_checkpoint(ckpt)


def test_a_resumed_run_splits_the_wall_time_of_all_its_processes(tiny_cfg, interrupt_after) -> None:
    """summary.json of a resumed run: wall_seconds covered the last process only, while its parts
    (set-up, rounds) came from every process's records, so the parts summed to more than the whole;
    the resuming process's own set-up was in neither."""
    cfg = tiny_cfg("rounds=3", "train.steps=20", name="twice")
    interrupt_after(cfg, 1)
    run = run_federated(cfg, resume=True, progress=False)
    s = json.loads((run.run_dir / io.SUMMARY).read_text())
    r0 = next(r for r in run.records if r["client"] is None and r["round"] == 0)
    assert s["setup_seconds"] > r0["setup_seconds"]  # + the resuming process's set-up
    assert s["setup_seconds"] + s["round_seconds"] + s["io_seconds"] <= s["wall_seconds"]
    assert s["wall_seconds"] - (s["setup_seconds"] + s["round_seconds"] + s["io_seconds"]) < 2.0  # export, plots

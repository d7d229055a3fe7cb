"""`fedtune tune` on the tiny model: trials are federated runs scored on the clients' validation
splits, a bad trial is pruned after round 1, a killed study resumes with its finished trials
kept, the best config runs as is, and a bad space file is refused by name before training."""

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.config import load_config
from fedtune.report import io

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
GOOD, BAD = 0.005, 1.0e-7  # on the tiny model: mean val ppl 264 after round 1 / 277 (the base model's)
THRESHOLD = 270.0  # --pruner threshold:270 prunes exactly the trials with the useless lr after round 1

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.xdist_group("tune")  # one worker makes the module's study once


def tune(study: Path, trials: int, space: Path):
    args = ["tune", TINY, "--space", str(space), "--trials", str(trials), "--study-dir", str(study)]
    args += ["--pruner", f"threshold:{THRESHOLD:g}", "--set", f"output_dir={study.parent / 'base'}"]
    return CliRunner().invoke(app, args)


def load(study: Path):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{study / 'study.db'}")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tune") / "study"
    space = d.parent / "space.yaml"
    space.write_text(f"train.lr: {{choices: [{GOOD}, {BAD:.1e}]}}\n")
    first = tune(d, 2, space)
    assert first.exit_code == 0, first.output
    before = {t.number: t for t in load(d).trials}
    # a study killed during a trial leaves it RUNNING in storage (here: the useless lr, so its re-run prunes)
    killed = load(d)
    killed.enqueue_trial({"train.lr": BAD})
    killed.ask({"train.lr": optuna.distributions.CategoricalDistribution([GOOD, BAD])})
    second = tune(d, 3, space)
    assert second.exit_code == 0, second.output
    return {"dir": d, "before": before, "output": second.output, "trials": load(d).trials}


def test_a_killed_study_resumes_with_its_finished_trials_kept(study) -> None:
    trials, before = study["trials"], study["before"]
    assert sorted(before) == [0, 1] and all(t.state.is_finished() for t in before.values())
    for n, t in before.items():  # untouched by the resumed study
        now = trials[n]
        assert (now.state, now.params, now.value, now.datetime_complete) == (
            t.state,
            t.params,
            t.value,
            t.datetime_complete,
        )
    killed, rerun = trials[2], trials[3]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.intermediate_values == {}
    assert rerun.params == {"train.lr": BAD} and rerun.user_attrs["rerun_of"] == 2
    assert len(trials) == 4  # --trials 3: three finished, the interrupted one not counted
    assert "trial 2 was interrupted" in study["output"]


def test_a_useless_trial_is_pruned_after_round_one_and_the_others_complete(study) -> None:
    states = optuna.trial.TrialState
    finished = [t for t in study["trials"] if t.state != states.FAIL]
    assert {t.state for t in finished} == {states.COMPLETE, states.PRUNED}  # the seeded TPE drew both lrs
    assert study["trials"][3].state == states.PRUNED and study["trials"][3].intermediate_values.keys() == {1}
    for t in finished:
        if t.params["train.lr"] == BAD:
            assert t.state == states.PRUNED and t.intermediate_values[1] > THRESHOLD
            assert io.read_status(study["dir"] / f"trial-{t.number:03d}")["state"] == "pruned"
            assert not (study["dir"] / f"trial-{t.number:03d}" / io.ERROR_LOG).exists()
        else:  # reported after every round, final value = the last round's mean val ppl
            assert t.state == states.COMPLETE and sorted(t.intermediate_values) == [1, 2]
            assert t.value == t.intermediate_values[2] < t.intermediate_values[1] < THRESHOLD
            summary = io.read_jsonl(study["dir"] / f"trial-{t.number:03d}" / io.METRICS)[-1]
            assert summary["round"] == 2 and summary["mean_val_ppl"] == t.value


def test_a_trial_that_ran_every_round_is_complete_not_pruned(tmp_path) -> None:
    """The pruner stops trials early; after the last round there is nothing left to stop. Here the
    useless lr's one round ends above the threshold: before, the trial was PRUNED after its last
    round (no value; with the median pruner and `evaluation.every` = rounds, every trial worse than
    the median was)."""
    space = tmp_path / "space.yaml"
    space.write_text(f"train.lr: {{choices: [{BAD:.1e}]}}\n")
    d = tmp_path / "study"
    args = ["tune", TINY, "--space", str(space), "--trials", "1", "--study-dir", str(d), "--set", "rounds=1"]
    args += ["--pruner", f"threshold:{THRESHOLD:g}", "--set", f"output_dir={tmp_path / 'base'}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    (t,) = load(d).trials
    assert t.state == optuna.trial.TrialState.COMPLETE and t.value == t.intermediate_values[1] > THRESHOLD
    assert io.read_status(d / "trial-000")["state"] == "complete"


def test_table_csv_and_plot_of_the_trials(study) -> None:
    d = study["dir"]
    rows = list(csv.DictReader((d / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["state"] for r in rows] == [t.state.name for t in study["trials"]]
    assert rows[2]["note"] == "interrupted (its values ran again)" and rows[3]["note"].startswith("re-run of trial 2")
    assert float(rows[3]["mean_val_ppl"]) == study["trials"][3].intermediate_values[1]
    assert all(float(r["seconds"]) > 0 for r in rows if r["state"] != "FAIL")
    assert "PRUNED" in study["output"] and "mean_val_ppl" in study["output"]
    assert (d / "trials.md").read_text().count("\n") == 2 + 4
    assert (d / "trials.png").stat().st_size > 5_000


def test_best_yaml_is_the_best_trial_and_runs(study, tmp_path) -> None:
    states = optuna.trial.TrialState
    done = [t for t in study["trials"] if t.state == states.COMPLETE]
    best = min(done, key=lambda t: t.value)
    path = study["dir"] / "best.yaml"
    cfg = load_config(path, [f"output_dir={tmp_path / 'best'}"])
    assert cfg.train.lr == best.params["train.lr"] and cfg.name == "tiny-best" and cfg.rounds == 2
    assert f"trial {best.number}, mean_val_ppl = {best.value:.6g}" in path.read_text()
    r = CliRunner().invoke(app, ["run", str(path), "--no-progress", "--set", f"output_dir={tmp_path / 'best'}"])
    assert r.exit_code == 0, r.output
    # the same experiment as the best trial: the same test perplexity after the last round
    trial = io.read_jsonl(study["dir"] / f"trial-{best.number:03d}" / io.METRICS)[-1]
    run = io.read_jsonl(tmp_path / "best" / io.METRICS)[-1]
    assert run["mean_ppl"] == pytest.approx(trial["mean_ppl"], rel=1e-6)


def test_a_bad_space_file_is_refused_by_name_before_training(tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("train.lrr: {low: 1.0e-4, high: 1.0e-2, log: true}\ntrain.steps: {low: 0, high: 8}\n")
    r = tune(tmp_path / "study", 3, space)
    assert r.exit_code == 2
    text = "".join(r.output.split())  # the console folds long lines (a long tmp path) anywhere
    assert f"{space}:train.lrr=0.0001" in text and "unknownkey" in text and "useoneof:" in text
    assert f"{space}:train.steps=0" in text and "greaterthanorequalto1" in text
    assert not (tmp_path / "study").exists()  # nothing was trained, no study was made


def test_per_client_gives_each_client_the_lr_of_its_own_best_trial(tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-3, high: 5.0e-2, log: true}\n")
    d, clients = tmp_path / "study", ["email", "http", "json", "logging"]
    args = ["tune", TINY, "--space", str(space), "--trials", "2", "--study-dir", str(d), "--per-client"]
    args += ["--pruner", "none", "--set", "rounds=1", "--set", f"output_dir={tmp_path}/b"]
    r = CliRunner().invoke(app, [*args, "--set", "data.val_fraction=0.3"])  # every client has a val split
    assert r.exit_code == 0, r.output
    own: dict[str, list[tuple[float, float]]] = {}  # client -> (its own val ppl, its lr) per trial
    for t in load(d).trials:
        run = d / f"trial-{t.number:03d}"
        lrs = load_config(run / io.CONFIG).train.client_lr
        assert lrs == {c: t.params[f"client_lr:{c}"] for c in clients}  # one lr per client, as proposed
        for rec in io.read_jsonl(run / io.METRICS):
            if rec["round"] == 1 and rec["client"]:
                own.setdefault(rec["client"], []).append((rec["val_ppl"], lrs[rec["client"]]))
    assert sorted(own) == clients and all(len(v) == 2 for v in own.values())
    best = load_config(d / "best.yaml")
    assert best.train.client_lr == {c: min(own[c])[1] for c in clients}


def test_a_study_interrupted_in_a_trial_resumes_to_the_same_trials(tmp_path, monkeypatch) -> None:
    """Ctrl-C in trial 1, then the same command again: the re-run and every later trial propose
    what the uninterrupted study did, so best.yaml is the same. The sampler was seeded from all
    trials, the failed one included: the resumed study's later values and its best differed."""
    import fedtune.recipes.federated as recipe
    from fedtune.recipes.tune import TuneSettings
    from fedtune.recipes.tune import tune as run_tune

    space = ROOT / "configs" / "spaces" / "lr-rank-steps.yaml"
    over = ["rounds=1", "train.steps=2", f"output_dir={tmp_path / 'base'}"]
    full = run_tune(Path(TINY), space, TuneSettings(4, pruner="none", study_dir=tmp_path / "full"), over)

    real, calls = recipe.run_federated, {"n": 0}

    def interrupted(cfg, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(recipe, "run_federated", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tune(Path(TINY), space, TuneSettings(4, pruner="none", study_dir=tmp_path / "cut"), over)
    monkeypatch.setattr(recipe, "run_federated", real)
    cut = run_tune(Path(TINY), space, TuneSettings(4, pruner="none", study_dir=tmp_path / "cut"), over)

    def done(rows):
        return [(r.params, r.value) for r in rows if r.state == "COMPLETE"]

    assert len(done(full.rows)) == 4 and done(cut.rows) == done(full.rows)
    assert full.best is not None and cut.best is not None and cut.best.params == full.best.params

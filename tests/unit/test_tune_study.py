"""The pieces of `fedtune tune` that need no training: pruners, the study's checks, which trials
count as finished, interrupted trials, the study lock, and the missing-extra message."""

from pathlib import Path

import pytest

from fedtune.config.load import load_config
from fedtune.config.space import Choices, FloatRange
from fedtune.errors import ConfigError, FedtuneError
from fedtune.recipes import tune as recipe
from fedtune.recipes import tune_study as study_
from fedtune.recipes.tune import TuneSettings

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
States = optuna.trial.TrialState


def study(pruner=None):
    return optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))


@pytest.mark.parametrize(
    ("minimize", "value", "pruned"), [(True, 280.0, True), (True, 260.0, False), (False, 0.2, True)]
)
def test_threshold_prunes_values_worse_than_it_in_the_metric_direction(minimize, value, pruned) -> None:
    limit = 270.0 if minimize else 0.5  # ppl: lower is better; accuracy: higher is better
    s = optuna.create_study(pruner=study_.build_pruner(f"threshold:{limit}", minimize))
    t = s.ask()
    t.report(value, 1)
    assert t.should_prune() is pruned


def test_median_waits_for_two_finished_trials_then_prunes_the_worse_half() -> None:
    s = study(study_.build_pruner("median", True))
    for v in (10.0, 20.0):
        t = s.ask()
        t.report(v, 1)
        assert not t.should_prune()  # no finished trials to compare with yet
        s.tell(t, v)
    worse, better = s.ask(), s.ask()
    worse.report(30.0, 1)
    better.report(5.0, 1)
    assert worse.should_prune() and not better.should_prune()


def test_the_study_settings_are_checked_all_at_once() -> None:
    cfg = load_config(TINY, ["engine.name=flower-sim", "data.val_fraction=0"])
    problems = recipe.study_problems(cfg, TuneSettings(0, metric="test_ppl", pruner="medain"))
    assert [p.field for p in problems] == ["--trials", "--metric", "--pruner", "engine.name", "data.val_fraction"]
    assert study_.pruner_problems("threshold:abc")[0].fix.startswith("use median")
    assert recipe.study_problems(load_config(TINY), TuneSettings(3, metric="val_mean_acc")) == []


def test_finished_counts_complete_pruned_and_errored_trials_not_interrupted_ones() -> None:
    s = study()
    s.tell(s.ask(), 1.0)
    s.tell(s.ask(), state=States.PRUNED)
    errored = s.ask()
    errored.set_user_attr("error", "TrainingDivergedError: loss is nan")
    s.tell(errored, state=States.FAIL)
    s.tell(s.ask(), state=States.FAIL)  # what recover_interrupted does to a killed trial
    s.ask()  # running
    assert study_.finished(s) == 3


def test_an_interrupted_trial_is_failed_and_its_values_run_again() -> None:
    s = study()
    dists = study_.distributions({"train.lr": FloatRange(1e-4, 1e-2, log=True), "adapter.r": Choices((4, 8))})
    s.tell(s.ask(dists), 1.0)
    killed = s.ask(dists)
    assert study_.recover_interrupted(s) == [killed.number]
    assert s.trials[killed.number].state == States.FAIL
    again = s.ask(dists)
    assert again.params == killed.params and again.user_attrs == {"rerun_of": killed.number}
    assert study_.recover_interrupted(s) == [again.number]  # killed again: queued again


def test_a_study_resumed_with_another_space_or_metric_is_refused(tmp_path) -> None:
    cfg = load_config(TINY)
    space = {"train.lr": FloatRange(1e-4, 1e-2, log=True)}

    def open_(space, metric="mean_val_ppl", trials=3):
        return study_.open_study(tmp_path, cfg.name, cfg.seed, space, metric, "median", trials)

    open_(space)
    assert open_(space, trials=5).user_attrs["metric"] == "mean_val_ppl"
    with pytest.raises(FedtuneError, match="started with space"):
        open_({"train.lr": FloatRange(1e-3, 1e-2)})
    with pytest.raises(FedtuneError, match="started with metric mean_val_ppl, not val_mean_acc"):
        open_(space, metric="val_mean_acc")


def test_a_study_already_being_run_is_refused(tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    d = tmp_path / "study"
    d.mkdir()
    with study_.study_lock(d), pytest.raises(FedtuneError, match="another `fedtune tune` is running"):
        recipe.tune(TINY, space, TuneSettings(1, study_dir=d), [f"output_dir={tmp_path / 'base'}"])
    assert not (d / "trial-000").exists()


def test_a_bad_experiment_is_refused_before_the_space_is_read(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.val_fraction"):
        recipe.tune(TINY, tmp_path / "missing.yaml", TuneSettings(2), ["data.val_fraction=0"])


def test_without_the_extra_the_error_says_what_to_install(monkeypatch, tmp_path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(FedtuneError, match=r"pip install 'fedtune\[tune\]'"):
        recipe.tune(TINY, tmp_path / "space.yaml", TuneSettings(2))


def test_per_client_lrs_are_gathered_and_each_client_takes_its_own_best() -> None:
    params = {"adapter.r": 4, "client_lr:a": 0.01, "client_lr:b": 0.001}
    assert recipe.trial_values(params) == {"adapter.r": 4, "train.client_lr": {"a": 0.01, "b": 0.001}}
    trials = [  # (trial, its values, each client's own val ppl in it)
        (0, {"client_lr:a": 0.01, "client_lr:b": 0.001}, {"a": 250.0, "b": 270.0}),
        (1, {"client_lr:a": 0.002, "client_lr:b": 0.03}, {"a": 260.0, "b": 255.0}),
        (2, {"client_lr:a": 0.005, "client_lr:b": 0.02}, {"a": 252.0}),  # b was not evaluated
    ]
    assert recipe.per_client_best(trials, minimize=True) == {"a": (0.01, 0, 250.0), "b": (0.03, 1, 255.0)}
    assert recipe.per_client_best(trials, minimize=False) == {"a": (0.002, 1, 260.0), "b": (0.001, 0, 270.0)}


def test_per_client_needs_train_lr_in_the_space(tmp_path) -> None:
    space = {"adapter.r": Choices((4, 8)), "train.lr": FloatRange(1e-4, 1e-2, log=True)}
    got = recipe.per_client_space(space, ["a", "b"], tmp_path / "s.yaml")
    assert got == {"adapter.r": Choices((4, 8)), "client_lr:a": space["train.lr"], "client_lr:b": space["train.lr"]}
    with pytest.raises(ConfigError, match="--per-client = .*s.yaml.*not in it"):
        recipe.per_client_space({"adapter.r": Choices((4, 8))}, ["a"], tmp_path / "s.yaml")


def test_rows_give_complete_and_pruned_trials_a_value_and_failed_ones_none() -> None:
    s = study()
    done, pruned, killed = s.ask(), s.ask(), s.ask()
    for t, v in ((done, 250.0), (pruned, 280.0), (killed, 260.0)):
        t.report(v + 5, 1)
    s.tell(done, 250.0)
    s.tell(pruned, state=States.PRUNED)
    s.tell(killed, state=States.FAIL)
    rows = study_.trial_rows(s)
    assert [(r.state, r.value) for r in rows] == [("COMPLETE", 250.0), ("PRUNED", 285.0), ("FAIL", None)]
    assert rows[2].note == "interrupted (its values ran again)" and rows[0].seconds is not None

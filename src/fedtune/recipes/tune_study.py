"""The Optuna side of `fedtune tune`: the study in STUDY/study.db (SQLite), its pruners, the
search space as Optuna distributions, interrupted trials, and the trials as table rows.
Optuna is imported inside the functions: it is the optional `tune` extra."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config.space import Choices, FloatRange, SearchSpace
from fedtune.errors import FedtuneError, Problem
from fedtune.report.trials import TrialRow
from fedtune.seeding import derive_seed

if TYPE_CHECKING:
    import optuna

DB = "study.db"
PRUNERS = "median (default; Optuna's MedianPruner after 2 finished trials), none, or threshold:VALUE"


def minimizes(metric: str) -> bool:
    return metric.endswith(("ppl", "loss"))


def pruner_problems(spec: str) -> list[Problem]:
    try:
        build_pruner(spec, True)
    except ValueError:
        return [Problem("--pruner", spec, "unknown pruner", f"use {PRUNERS}")]
    return []


def build_pruner(spec: str, minimize: bool) -> optuna.pruners.BasePruner:
    """`median`: prune a trial whose round-r value is worse than the median of earlier trials at
    round r (after 2 finished trials); `threshold:V`: worse than V at any round; `none`."""
    from optuna import pruners

    name, _, arg = spec.partition(":")
    if name == "median" and not arg:
        return pruners.MedianPruner(n_startup_trials=2)
    if name == "none" and not arg:
        return pruners.NopPruner()
    if name == "threshold":
        value = float(arg)  # ValueError: not a number
        return pruners.ThresholdPruner(upper=value) if minimize else pruners.ThresholdPruner(lower=value)
    raise ValueError(spec)


def open_study(
    study_dir: Path, name: str, seed: int, space: SearchSpace, metric: str, pruner: str, trials: int
) -> optuna.Study:
    """The study in STUDY/study.db (created, or loaded with its trials); its metric and space
    must be the ones it was started with. TPE is seeded from the experiment's seed and the number
    of trials finished so far (`sampler_for`, again before every proposal), so a resumed study
    proposes what an uninterrupted one would."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    study = optuna.create_study(
        storage=f"sqlite:///{(study_dir / DB).resolve()}",
        study_name=name,
        direction="minimize" if minimizes(metric) else "maximize",
        pruner=build_pruner(pruner, minimizes(metric)),
        load_if_exists=True,
    )
    made = {"metric": metric, "space": space_json(space)}
    for key, value in made.items():
        before = study.user_attrs.get(key)
        if before is None:
            study.set_user_attr(key, value)
        elif before != value:
            raise FedtuneError(
                f"the study in {study_dir} was started with {key} {before}, not {value}: its trials are not "
                "comparable. Use the same settings to resume it, or --study-dir NEW for a new study"
            )
    study.sampler = sampler_for(seed, finished(study), trials)
    return study


def sampler_for(seed: int, done: int, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler of the next proposal, seeded from the run seed and the trials finished so far:
    an interrupted trial (failed, then queued again) does not shift the seeds, so a resumed study
    proposes what an uninterrupted one would (seeding from all trials, failed ones included, once
    per process, made the resumed study's later trials and its best differ)."""
    import optuna

    startup = min(10, max(2, trials // 2))  # TPE models the space after these random trials
    return optuna.samplers.TPESampler(seed=derive_seed(seed, "tune", done) % 2**32, n_startup_trials=startup)


def space_json(space: SearchSpace) -> str:
    return json.dumps({k: {"kind": type(d).__name__, **asdict(d)} for k, d in space.items()}, sort_keys=True)


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    from optuna import distributions as d

    out: dict[str, d.BaseDistribution] = {}
    for key, dim in space.items():
        if isinstance(dim, Choices):
            out[key] = d.CategoricalDistribution(dim.values)
        elif isinstance(dim, FloatRange):
            out[key] = d.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
        else:
            out[key] = d.IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return out


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """One `fedtune tune` per study: a trial another live process is running is not 'interrupted'.
    The lock dies with its process, so a killed study never blocks its own resumption."""
    with (study_dir / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedtuneError(
                f"another `fedtune tune` is running the study in {study_dir}; wait for it, or use --study-dir OTHER"
            ) from None
        yield


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Trials left RUNNING (the study was killed during them; we hold the lock, so no live process
    runs them): failed, not counted as finished, and their values queued to run again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"rerun_of": t.number})
    return [t.number for t in stale]


def finished(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete, pruned, or failed with an error of their own."""
    from optuna.trial import TrialState

    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and "error" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """Every trial as a row; a pruned trial's value is its last reported round, a failed one has none."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = t.intermediate_values
        value = t.value if t.state == TrialState.COMPLETE else None
        if t.state == TrialState.PRUNED and steps:  # an interrupted or failed trial has no value
            value = steps[max(steps)]
        note = str(t.user_attrs.get("note") or t.user_attrs.get("error") or "")
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            note = "interrupted (its values ran again)"
        if "rerun_of" in t.user_attrs:
            note = f"re-run of trial {t.user_attrs['rerun_of']}" + (f"; {note}" if note else "")
        secs = t.duration.total_seconds() if t.duration is not None else None
        rows.append(TrialRow(t.number, t.state.name, value, secs, dict(t.params), note))
    return rows


def require_optuna() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise FedtuneError("`fedtune tune` needs Optuna: pip install 'fedtune[tune]' (it pins optuna==5.0.0)")

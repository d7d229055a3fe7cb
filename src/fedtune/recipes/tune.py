"""Federated hyper-parameter search (`fedtune tune CONFIG --space space.yaml --trials N`), top to
bottom: check the experiment and the space -> open (or resume) the study in STUDY/study.db ->
trials left running by a killed study are failed and queued again -> until N trials are finished:
ask TPE for values -> a federated run with them applied as `--set` would, in STUDY/trial-NNN,
reporting the round records' validation metric after every round to the pruner -> tell the
result -> the table, trials.csv / .md, trials.png and best.yaml.

The objective is the aggregated validation metric the server already receives in its round
records (the clients' mean validation perplexity, or a task metric), never data."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedtune.config import ExperimentConfig
from fedtune.config.load import apply_overrides, config_from_dict, config_to_yaml, read_yaml, with_values
from fedtune.config.space import Choices, FloatRange, SearchSpace, load_space
from fedtune.errors import ConfigError, FedtuneError, Problem
from fedtune.report import io
from fedtune.report.records import TASK_METRICS
from fedtune.report.trials import TrialRow, plot_trials, write_trials
from fedtune.seeding import derive_seed

if TYPE_CHECKING:
    import optuna

METRICS = ("mean_val_ppl", *(f"val_mean_{k}" for k in TASK_METRICS))
FORCED = {"evaluation.val": True}  # every trial scores the model each client ends with on its val split
DB, BEST, PLOT = "study.db", "best.yaml", "trials.png"
PRUNERS = "median (default; Optuna's MedianPruner after 2 finished trials), none, or threshold:VALUE"


@dataclass(frozen=True)
class TuneSettings:
    trials: int
    metric: str = "mean_val_ppl"
    pruner: str = "median"
    study_dir: Path | None = None  # default: the experiment's run dir + "-tune"


@dataclass(frozen=True)
class TuneResult:
    study_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    files: list[Path]


def minimizes(metric: str) -> bool:
    return metric.endswith(("ppl", "loss"))


def tune(
    config: Path,
    space_path: Path,
    settings: TuneSettings,
    overrides: Sequence[str] = (),
    console: Console | None = None,
) -> TuneResult:
    """Run (or resume) the study until `settings.trials` trials are finished (complete, pruned,
    or failed with an error such as a diverged loss); interrupted trials do not count."""
    console = console or Console(stderr=True)
    _require_optuna()
    from optuna.trial import TrialState

    # 1. the experiment, the space and the study settings: every problem before any training
    user = apply_overrides(read_yaml(config), list(overrides))
    base = with_values(user, FORCED)
    cfg = config_from_dict(base)
    problems = study_problems(cfg, settings)
    if problems:
        raise ConfigError(problems)
    space = load_space(space_path, base)
    study_dir = settings.study_dir or Path(f"{cfg.run_dir()}-tune")
    study_dir.mkdir(parents=True, exist_ok=True)

    with study_lock(study_dir):
        # 2. open or resume; a trial a killed study left running is failed and queued again
        study = open_study(study_dir, cfg, space, settings)
        for n in recover_interrupted(study):
            console.print(f"trial {n} was interrupted: marked failed, its values queued to run again")

        # 3. trials
        dists = distributions(space)
        while (done := finished(study)) < settings.trials:
            trial = study.ask(dists)
            shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
            console.print(f"trial {trial.number} ({done + 1}/{settings.trials}): {shown}", highlight=False)
            run_trial(study, trial, base, study_dir / f"trial-{trial.number:03d}", settings.metric)
            row = next(r for r in trial_rows(study) if r.number == trial.number)
            console.print(f"  {row.state.lower()}: {settings.metric} = {_short(row.value)} {row.note}", highlight=False)

        # 4. report
        rows = trial_rows(study)
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        best = next(r for r in rows if r.number == study.best_trial.number) if complete else None
        files = write_trials(rows, study_dir, settings.metric)
        files.append(plot_trials(rows, study_dir / PLOT, settings.metric, minimizes(settings.metric)))
        if best is not None:
            files.append(write_best(study_dir / BEST, user, cfg, best, settings.metric, len(complete)))
    return TuneResult(study_dir, rows, best, files)


def study_problems(cfg: ExperimentConfig, settings: TuneSettings) -> list[Problem]:
    """What makes the study impossible, before any training (the space is checked separately)."""
    problems = []
    if settings.trials < 1:
        problems.append(Problem("--trials", settings.trials, "must be at least 1", "e.g. --trials 20"))
    if settings.metric not in METRICS:
        problems.append(Problem("--metric", settings.metric, "not a validation metric", f"use one of {METRICS}"))
    problems += pruner_problems(settings.pruner)
    if cfg.engine.name != "inprocess":
        fix = "tune on the in-process engine, then run best.yaml on Flower"
        problems.append(Problem("engine.name", cfg.engine.name, "fedtune tune runs its trials in-process", fix))
    if cfg.data.val_fraction <= 0:
        fix = "give the clients a validation split, e.g. data.val_fraction: 0.1 (never tune on the test split)"
        problems.append(Problem("data.val_fraction", cfg.data.val_fraction, "trials are scored on it", fix))
    return problems


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


def open_study(study_dir: Path, cfg: ExperimentConfig, space: SearchSpace, settings: TuneSettings) -> optuna.Study:
    """The study in STUDY/study.db (created, or loaded with its trials); its metric and space
    must be the ones it was started with. TPE is seeded from the experiment's seed and the number
    of trials so far, so a resumed study does not propose its first values again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    study = optuna.create_study(
        storage=f"sqlite:///{(study_dir / DB).resolve()}",
        study_name=cfg.name,
        direction="minimize" if minimizes(settings.metric) else "maximize",
        pruner=build_pruner(settings.pruner, minimizes(settings.metric)),
        load_if_exists=True,
    )
    made = {"metric": settings.metric, "space": space_json(space)}
    for key, value in made.items():
        before = study.user_attrs.get(key)
        if before is None:
            study.set_user_attr(key, value)
        elif before != value:
            raise FedtuneError(
                f"the study in {study_dir} was started with {key} {before}, not {value}: its trials are not "
                "comparable. Use the same settings to resume it, or --study-dir NEW for a new study"
            )
    startup = min(10, max(2, settings.trials // 2))  # TPE models the space after these random trials
    seed = derive_seed(cfg.seed, "tune", len(study.trials)) % 2**32  # numpy RandomState seeds are 32-bit
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return study


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


def round_value(run_dir: Path, rnd: int, metric: str) -> float | None:
    """The metric in round `rnd`'s summary record (client = null), if that round was evaluated."""
    for r in reversed(io.read_jsonl(run_dir / io.METRICS)):
        if r.get("client") is None and r["round"] == rnd:
            return None if r.get(metric) is None else float(r[metric])
    return None


def final_value(records: Sequence[dict[str, Any]], metric: str) -> float | None:
    """The metric of the last evaluated round after training (round 0 is the base model)."""
    vals = [r[metric] for r in records if r.get("client") is None and r["round"] >= 1 and r.get(metric) is not None]
    return float(vals[-1]) if vals else None


def run_trial(study: optuna.Study, trial: optuna.Trial, base: dict[str, Any], run_dir: Path, metric: str) -> None:
    """One federated run with the trial's values; the value of every evaluated round goes to the
    pruner as it finishes (`run_federated`'s after_round). Told to the study: COMPLETE with the
    final value, PRUNED, or FAIL with the error; an interruption leaves it RUNNING (resumable)."""
    import optuna
    from optuna.trial import TrialState

    from fedtune.recipes.federated import run_federated

    def after_round(rnd: int) -> None:
        value = round_value(run_dir, rnd, metric)
        if value is None:  # not evaluated this round (evaluation.every)
            return
        trial.report(value, rnd)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after round {rnd} ({metric} = {value:.4g})")

    trial.set_user_attr("run_dir", run_dir.name)
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        try:
            cfg = config_from_dict(with_values(base, {**trial.params, "output_dir": str(run_dir)}))
            result = run_federated(
                cfg, overwrite=True, progress=False, after_round=after_round, console=Console(file=log, width=120)
            )
        except optuna.TrialPruned as e:
            trial.set_user_attr("note", str(e))
            io.write_status(run_dir, "pruned", reason=str(e))
            study.tell(trial, state=TrialState.PRUNED)
            return
        except Exception as e:  # a diverged loss is a result (a failed trial); a bug is re-raised
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(e, FedtuneError):
                return
            raise
    value = final_value(result.records, metric)
    if value is None:
        why = f"the round records of {run_dir} have no {metric} (task metrics need instruction data)"
        trial.set_user_attr("error", why)
        study.tell(trial, state=TrialState.FAIL)
        raise FedtuneError(f"{why}; use --metric mean_val_ppl or a metric the task has")
    study.tell(trial, value)


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """Every trial as a row; a pruned trial's value is its last reported round."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = t.intermediate_values
        value = t.value if t.state == TrialState.COMPLETE else steps[max(steps)] if steps else None
        note = str(t.user_attrs.get("note") or t.user_attrs.get("error") or "")
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            note = "interrupted (its values ran again)"
        if "rerun_of" in t.user_attrs:
            note = f"re-run of trial {t.user_attrs['rerun_of']}" + (f"; {note}" if note else "")
        secs = t.duration.total_seconds() if t.duration is not None else None
        rows.append(TrialRow(t.number, t.state.name, value, secs, dict(t.params), note))
    return rows


def write_best(path: Path, user: dict[str, Any], cfg: ExperimentConfig, best: TrialRow, metric: str, n: int) -> Path:
    """The experiment (as given, with its --set overrides) with the best trial's values: the full
    config, named NAME-best, ready for `fedtune run`."""
    best_cfg = config_from_dict(with_values(user, {**best.params, "name": f"{cfg.name}-best"}))
    header = (
        f"# fedtune tune: the best of {n} completed trials: trial {best.number}, {metric} = {best.value:.6g}\n"
        f"#   values: {', '.join(f'{k}={v}' for k, v in best.params.items())}\n"
        f"#   fedtune run {path}\n"
    )
    io.write_atomic(path, header + config_to_yaml(best_cfg))
    return path


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _require_optuna() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise FedtuneError("`fedtune tune` needs Optuna: pip install 'fedtune[tune]' (it pins optuna==5.0.0)")

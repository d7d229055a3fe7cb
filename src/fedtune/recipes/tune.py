"""Federated hyper-parameter search (`fedtune tune CONFIG --space space.yaml --trials N`), top to
bottom: check the experiment and the space -> open (or resume) the study in STUDY/study.db ->
trials left running by a killed study are failed and queued again -> until N trials are finished:
ask TPE for values -> a federated run with them applied as `--set` would, in STUDY/trial-NNN,
reporting the round records' validation metric after every round to the pruner -> tell the
result -> the table, trials.csv / .md, trials.png and best.yaml.

The objective is the aggregated validation metric the server already receives in its round
records (the clients' mean validation perplexity, or a task metric), never data. With
`--per-client` each client's local lr is its own dimension (train.client_lr), and best.yaml gives
each client the lr of the trial in which its own validation metric was best."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedtune.config import ExperimentConfig
from fedtune.config.load import apply_overrides, config_from_dict, config_to_yaml, read_yaml, with_values
from fedtune.config.space import SearchSpace, load_space
from fedtune.errors import ConfigError, FedtuneError, Problem
from fedtune.evaluation.metrics import TASK_METRICS
from fedtune.recipes.tune_study import (
    distributions,
    finished,
    minimizes,
    open_study,
    pruner_problems,
    recover_interrupted,
    require_optuna,
    sampler_for,
    study_lock,
    trial_rows,
)
from fedtune.report import io
from fedtune.report.trials import TrialRow, plot_trials, write_trials

if TYPE_CHECKING:
    import optuna

METRICS = ("mean_val_ppl", *(f"val_mean_{k}" for k in TASK_METRICS))
FORCED = {"evaluation.val": True}  # every trial scores the model each client ends with on its val split
BEST, PLOT = "best.yaml", "trials.png"
CLIENT_LR = "client_lr:"  # --per-client: the parameter of one client's local lr is CLIENT_LR + its id


@dataclass(frozen=True)
class TuneSettings:
    trials: int
    metric: str = "mean_val_ppl"
    pruner: str = "median"
    study_dir: Path | None = None  # default: the experiment's run dir + "-tune"
    per_client: bool = False  # each client its own train.lr, picked on its own validation split


@dataclass(frozen=True)
class TuneResult:
    study_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    files: list[Path]


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
    require_optuna()
    from optuna.trial import TrialState

    # 1. the experiment, the space and the study settings: every problem before any training
    user = apply_overrides(read_yaml(config), list(overrides))
    base = with_values(user, FORCED)
    cfg = config_from_dict(base)
    problems = study_problems(cfg, settings)
    if problems:
        raise ConfigError(problems)
    space = load_space(space_path, base)
    if settings.per_client:
        space = per_client_space(space, client_ids(cfg), space_path)
    study_dir = settings.study_dir or Path(f"{cfg.run_dir()}-tune")
    study_dir.mkdir(parents=True, exist_ok=True)

    with study_lock(study_dir):
        # 2. open or resume; a trial a killed study left running is failed and queued again
        m = settings.metric
        study = open_study(study_dir, cfg.name, cfg.seed, space, m, settings.pruner, settings.trials)
        for n in recover_interrupted(study):
            console.print(f"trial {n} was interrupted: marked failed, its values queued to run again")

        # 3. trials
        dists = distributions(space)
        while (done := finished(study)) < settings.trials:
            study.sampler = sampler_for(cfg.seed, done, settings.trials)  # the same seeds resumed or not
            trial = study.ask(dists)
            shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
            console.print(f"trial {trial.number} ({done + 1}/{settings.trials}): {shown}", highlight=False)
            run_trial(study, trial, base, study_dir / f"trial-{trial.number:03d}", m)
            row = next(r for r in trial_rows(study) if r.number == trial.number)
            console.print(f"  {row.state.lower()}: {m} = {_short(row.value)} {row.note}", highlight=False)

        # 4. report
        rows = trial_rows(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = next(r for r in rows if r.number == study.best_trial.number) if complete else None
        files = write_trials(rows, study_dir, m)
        files.append(plot_trials(rows, study_dir / PLOT, m, minimizes(m)))
        if best is not None:
            own = [(t.number, t.params, t.user_attrs.get("client_values", {})) for t in complete]
            picks = per_client_best(own, minimizes(m)) if settings.per_client else None
            files.append(write_best(study_dir / BEST, user, cfg, best, m, len(complete), picks))
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
    pruner as it finishes (`run_federated`'s after_round), except the last round's: a pruner stops
    a trial early, and a trial that ran every round is finished (its value is the result). Told
    to the study: COMPLETE with the final value, PRUNED, or FAIL with the error; an interruption
    leaves it RUNNING (resumable)."""
    import optuna
    from optuna.trial import TrialState

    from fedtune.recipes.federated import run_federated

    rounds = 0  # the trial's cfg.rounds, set once its config is built

    def after_round(rnd: int) -> None:
        value = round_value(run_dir, rnd, metric)
        if value is None:  # not evaluated this round (evaluation.every)
            return
        trial.report(value, rnd)
        if rnd < rounds and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after round {rnd} ({metric} = {value:.4g})")

    trial.set_user_attr("run_dir", run_dir.name)
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        try:
            cfg = config_from_dict(with_values(base, {**trial_values(trial.params), "output_dir": str(run_dir)}))
            rounds = cfg.rounds
            result = run_federated(
                cfg, overwrite=True, progress=False, after_round=after_round, console=Console(file=log, width=120)
            )
        except optuna.TrialPruned as e:
            trial.set_user_attr("note", str(e))
            io.write_status(run_dir, "pruned", reason=str(e))
            (run_dir / io.ERROR_LOG).unlink(missing_ok=True)  # stopping a trial early is not an error
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
    trial.set_user_attr("client_values", client_values(result.records, metric))
    study.tell(trial, value)


def write_best(
    path: Path,
    user: dict[str, Any],
    cfg: ExperimentConfig,
    best: TrialRow,
    metric: str,
    n: int,
    picks: Mapping[str, tuple[float, int, float]] | None = None,
) -> Path:
    """The experiment (as given, with its --set overrides) with the best trial's values: the full
    config, named NAME-best, ready for `fedtune run`. `picks` (--per-client): each client's lr
    from the trial where its own validation metric was best (a client with no validation split
    keeps the best trial's lr)."""
    values = trial_values(best.params)
    shared = ", ".join(f"{k}={v}" for k, v in best.params.items() if not k.startswith(CLIENT_LR))
    notes = [f"#   values: {shared}"] if shared else []
    if picks is not None and "train.client_lr" in values:
        lrs = dict(values["train.client_lr"])
        for cid in sorted(lrs):
            if cid in picks:
                lrs[cid], t, v = picks[cid]
                notes.append(
                    f"#   client {cid}: lr {lrs[cid]:.4g} from trial {t} (its own {client_key(metric)}: {v:.6g})"
                )
            else:
                notes.append(f"#   client {cid}: lr {lrs[cid]:.4g} of trial {best.number} (it has no validation value)")
        values["train.client_lr"] = lrs
    best_cfg = config_from_dict(with_values(user, {**values, "name": f"{cfg.name}-best"}))
    header = [
        f"# fedtune tune: the best of {n} completed trials: trial {best.number}, {metric} = {best.value:.6g}",
        *notes,
        f"#   fedtune run {path}",
    ]
    io.write_atomic(path, "\n".join(header) + "\n" + config_to_yaml(best_cfg))
    return path


def client_ids(cfg: ExperimentConfig) -> list[str]:
    """The federation's client ids (the partition of the data; no model loads)."""
    from fedtune.data.partition import partition
    from fedtune.data.sources import load_corpus

    return list(partition(load_corpus(cfg.data), cfg.partition, cfg.seed))


def per_client_space(space: SearchSpace, ids: Sequence[str], where: Path) -> SearchSpace:
    """--per-client: `train.lr`'s range once per client (CLIENT_LR + id); the rest as it is."""
    if "train.lr" not in space:
        fix = f"add e.g. `train.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}` to {where}"
        raise ConfigError(
            [Problem("--per-client", str(where), "searches each client's train.lr, which is not in it", fix)]
        )
    rest = {k: d for k, d in space.items() if k != "train.lr"}
    return {**rest, **{CLIENT_LR + cid: space["train.lr"] for cid in ids}}


def trial_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters as config values: the per-client lrs gathered into train.client_lr."""
    values = {k: v for k, v in params.items() if not k.startswith(CLIENT_LR)}
    lrs = {k[len(CLIENT_LR) :]: v for k, v in params.items() if k.startswith(CLIENT_LR)}
    return {**values, "train.client_lr": lrs} if lrs else values


def client_values(records: Sequence[dict[str, Any]], metric: str) -> dict[str, float]:
    """Each client's own value of the metric (its val_ppl / val_acc ...) at the last evaluated round."""
    key = client_key(metric)
    last = max((r["round"] for r in records if r.get("client") is not None and key in r), default=None)
    return {
        r["client"]: float(r[key]) for r in records if r.get("client") is not None and r["round"] == last and key in r
    }


def client_key(metric: str) -> str:
    """The per-client record field a round-record metric averages: mean_val_ppl -> val_ppl."""
    return "val_ppl" if metric == "mean_val_ppl" else "val_" + metric.removeprefix("val_mean_")


def per_client_best(
    trials: Sequence[tuple[int, Mapping[str, Any], Mapping[str, float]]], minimize: bool
) -> dict[str, tuple[float, int, float]]:
    """For each client, (its lr, trial number, its own value) of the completed trial in which its
    own validation metric was best: each party's lr chosen on its own validation split."""
    out: dict[str, tuple[float, int, float]] = {}
    for number, params, own in trials:
        for cid, v in own.items():
            lr = params.get(CLIENT_LR + cid)
            if lr is not None and (cid not in out or (v < out[cid][2] if minimize else v > out[cid][2])):
                out[cid] = (float(lr), number, v)
    return out


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

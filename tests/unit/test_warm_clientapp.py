"""The warm `flwr-clientapp` (fedtune.engines.flower.warm): a shim hands its argv, environment,
working directory and streams to a zygote that forks the process; exit codes and signals pass
through; each child's generators are reseeded; without a zygote the shim runs the real binary."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedtune.engines.flower.warm import SOCKET_ENV, write_shim

# the stand-in for Flower's flwr_clientapp(): what a forked child sees, written to its stdout
APP = """
import os, sys, time, torch
WARMED = False
def warm():  # a set-up ahead that shows a progress bar, as datasets' map does (tqdm starts a thread)
    global WARMED
    from tqdm import tqdm
    list(tqdm(range(3), disable=True))
    WARMED = True
def broken():
    raise RuntimeError("not a fedtune app")
def main():
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("WARM_TEST"), "warmed", WARMED, flush=True)
    print("draw", float(torch.rand(1)), "pid", os.getpid(), flush=True)
    mode = sys.argv[1]
    if mode == "sleep":
        time.sleep(60)
    sys.exit(int(mode))
"""
REAL = """#!{python}
import sys
print("cold", sys.argv[1:], flush=True)
sys.exit(5)
"""


def start_zygote(tmp_path: Path, warm_up: str = "None") -> tuple[subprocess.Popen[bytes], Path]:
    (tmp_path / "fake_app.py").write_text(APP)
    sock = tmp_path / "z.sock"
    code = (
        "import os, fake_app; from pathlib import Path; from fedtune.engines.flower.warm import listen, serve; "
        f"serve(listen(Path({str(sock)!r})), os.getppid(), preload=('torch', 'fake_app'), entry='fake_app:main', "
        f"warm_up={warm_up})"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    z = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:  # bound first, then the imports
        time.sleep(0.05)
    return z, sock


def shim(tmp_path: Path) -> Path:
    real = tmp_path / "real-clientapp"
    real.write_text(REAL.format(python=sys.executable))
    real.chmod(0o755)
    return write_shim(tmp_path / "bin", real)


def run(exe: Path, args: list[str], sock: Path | None, cwd: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WARM_TEST": "from-the-requester"}
    env.pop(SOCKET_ENV, None)
    if sock is not None:
        env[SOCKET_ENV] = str(sock)
    return subprocess.Popen([str(exe), *args], env=env, cwd=cwd, stdout=out.open("wb"), stderr=subprocess.STDOUT)


def test_forked_clientapps_take_the_requesters_process_and_report_its_exit(tmp_path) -> None:
    exe = shim(tmp_path)
    z, sock = start_zygote(tmp_path)
    try:
        work = tmp_path / "work"
        work.mkdir()
        a = run(exe, ["3", "x"], sock, work, tmp_path / "a.out")
        b = run(exe, ["0"], sock, work, tmp_path / "b.out")
        assert a.wait(timeout=120) == 3 and b.wait(timeout=120) == 0
        outa, outb = (tmp_path / "a.out").read_text(), (tmp_path / "b.out").read_text()
        assert f"argv ['3', 'x'] cwd {work} env from-the-requester" in outa
        draws = [line.split()[1] for line in (outa + outb).splitlines() if line.startswith("draw")]
        assert len(draws) == 2 and draws[0] != draws[1]  # reseeded: not the zygote's copied generator
        pids = {int(line.split()[3]) for line in (outa + outb).splitlines() if line.startswith("draw")}
        assert a.pid not in pids and b.pid not in pids  # forked by the zygote, not run by the shim

        c = run(exe, ["sleep"], sock, work, tmp_path / "c.out")
        deadline = time.monotonic() + 60
        while "pid" not in (tmp_path / "c.out").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int((tmp_path / "c.out").read_text().split("pid")[1].split()[0])
        c.send_signal(signal.SIGTERM)  # forwarded: the forked child ends, and the shim with its code
        assert c.wait(timeout=60) == -signal.SIGTERM
        time.sleep(0.5)
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    finally:
        z.terminate()
        z.wait(timeout=30)


def test_a_zygote_serves_after_its_set_up_ahead_even_when_it_showed_a_bar_or_failed(tmp_path) -> None:
    """The warm-up runs before the fork loop; tqdm's monitor thread (started by any bar, even a
    disabled one) made the zygote refuse to serve: every message then ran cold. A failed warm-up
    is reported and the zygote serves anyway."""
    exe = shim(tmp_path)
    for warm_up, warmed in (("fake_app.warm", "True"), ("fake_app.broken", "False")):
        (tmp_path / "z.sock").unlink(missing_ok=True)
        z, sock = start_zygote(tmp_path, warm_up)
        try:
            p = run(exe, ["0"], sock, tmp_path, tmp_path / "w.out")
            assert p.wait(timeout=120) == 0, (tmp_path / "w.out").read_text()  # not the cold binary's 5
            assert f"warmed {warmed}" in (tmp_path / "w.out").read_text()
        finally:
            z.terminate()
            z.wait(timeout=30)


def test_without_a_zygote_the_shim_runs_the_real_clientapp(tmp_path) -> None:
    exe = shim(tmp_path)
    p = run(exe, ["--token", "t"], tmp_path / "absent.sock", tmp_path, tmp_path / "o.out")
    assert p.wait(timeout=60) == 5
    assert "cold ['--token', 't']" in (tmp_path / "o.out").read_text()
    p = run(exe, ["--token", "t"], None, tmp_path, tmp_path / "o2.out")
    assert p.wait(timeout=60) == 5


def test_a_node_set_up_ahead_is_the_runtime_its_clientapp_uses(tiny_cfg, tmp_path, monkeypatch) -> None:
    """`preload_node` (what a zygote runs with $FEDTUNE_WARM_APP) caches the runtime under the key
    the ClientApp computes from the run config Flower builds from the same app; a trust_distill app
    gets its party's own model instead."""
    from types import SimpleNamespace

    from flwr.common.config import get_fused_config_from_dir

    from fedtune.config import load_config
    from fedtune.engines.flower import client_app, party_node
    from fedtune.engines.flower_deploy import write_app

    assert client_app._uses_cuda("cuda:0") and not client_app._uses_cuda("cpu")
    client_app._uses_cuda("auto")
    assert not torch.cuda.is_initialized()  # asked NVML (a CPU build: nothing at all), not the CUDA runtime
    monkeypatch.setattr(client_app, "_uses_cuda", lambda device: False)  # the CPU path on any machine
    app = write_app(tiny_cfg("data.labels=[email, json]"), tmp_path / "app", 2)
    node = {"partition-id": 1, "state-dir": str(tmp_path / "state")}
    assert client_app.preload_node(app, node).startswith("json: tokenizer, shard, model")
    ctx = SimpleNamespace(run_config=get_fused_config_from_dir(app, {}), node_config=node)
    key = client_app.node_of(ctx, None, None)
    assert key in client_app._RUNTIMES
    assert client_app.client_runtime(*key) is client_app._RUNTIMES[key]  # nothing built again

    root = Path(__file__).resolve().parents[2]
    distill = load_config(root / "configs" / "tiny-trust-distill.yaml", [f"output_dir={tmp_path / 'd'}"])
    app2 = write_app(distill, tmp_path / "app2", 3)
    assert client_app.preload_node(app2, {"partition-id": 0, "state-dir": str(tmp_path / "s2")}).startswith("email:")
    key2 = client_app.node_of(SimpleNamespace(run_config=get_fused_config_from_dir(app2, {}), node_config={
        "partition-id": 0, "state-dir": str(tmp_path / "s2")}), None, None)  # fmt: skip
    assert key2 in party_node._PARTIES and key2 not in client_app._RUNTIMES

    # on a CUDA device the zygote never touches CUDA (a forked child could not use it): no model
    monkeypatch.setattr(client_app, "_uses_cuda", lambda device: device == "auto")  # as on a GPU machine
    app3 = write_app(tiny_cfg("data.labels=[email, json]", "data.max_train_blocks=9", name="c"), tmp_path / "app3", 2)
    what = client_app.preload_node(app3, {"partition-id": 0, "state-dir": str(tmp_path / "s3")})
    assert what == "email: tokenizer and shard (the model loads per message on CUDA)"
    assert not torch.cuda.is_initialized()
    key3 = client_app.node_of(SimpleNamespace(run_config=get_fused_config_from_dir(app3, {}), node_config={
        "partition-id": 0, "state-dir": str(tmp_path / "s3")}), None, None)  # fmt: skip
    assert key3 not in client_app._RUNTIMES


def test_the_supernode_sleeps_capped_are_flowers_own() -> None:
    """What `cap_supernode_polls` relies on, read from the installed Flower: its SuperNode loop uses
    `time` only to sleep, 3 s when it pulled nothing and 0.5 s while it waits for a reply. A Flower
    release that changes them fails here, not silently in a deployment."""
    import inspect
    import re

    from flwr.supernode import start_client_internal as loop

    src = inspect.getsource(loop)
    assert set(re.findall(r"\btime\.(\w+)", src)) == {"sleep"}
    assert re.findall(r"\btime\.sleep\(([^)]*)\)", src) == ["3", "0.5", "0.5"]


def test_capped_sleeps_in_the_supernode_loop(monkeypatch) -> None:
    from flwr.supernode import start_client_internal as loop

    from fedtune.engines.flower import warm

    slept: list[float] = []
    capped = warm.CappedSleep(0.25, slept.append)
    for s in (3, 0.5, 0.1):
        capped.sleep(s)
    assert slept == [0.25, 0.25, 0.1]
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    warm.cap_supernode_polls(0.2)
    assert isinstance(loop.time, warm.CappedSleep) and loop.time.cap == 0.2


def test_the_poll_cap_setting_is_checked_before_any_process_starts(tmp_path, monkeypatch) -> None:
    from fedtune.engines.flower.warm import POLL_ENV, POLL_S, poll_cap
    from fedtune.engines.flower_deploy import LocalDeployment
    from fedtune.errors import FedtuneError

    assert (poll_cap(None), poll_cap(""), poll_cap("flower"), poll_cap("0.1")) == (POLL_S, POLL_S, None, 0.1)
    for bad in ("0", "-1", "5", "fast"):
        with pytest.raises(ValueError, match=f"{POLL_ENV}='{bad}'"):
            poll_cap(bad)
    monkeypatch.setenv(POLL_ENV, "fast")
    with pytest.raises(FedtuneError, match=f"{POLL_ENV}='fast'"):
        LocalDeployment(tmp_path / "work", 1, tls=False)
    assert not (tmp_path / "work" / "supernode-0.log").exists()
    LocalDeployment(tmp_path / "cold", 1, tls=False, warm=False)  # Flower's own SuperNode: the setting is not used

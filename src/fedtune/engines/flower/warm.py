"""Warm ClientApp processes for a Flower SuperNode: Flower's own `flwr-clientapp`, started by
fork from a process that has already imported it and the training stack.

A SuperNode in Flower's default `subprocess` isolation starts one `flwr-clientapp` process per
message (its `flower-superexec` runs it by name, found on PATH), and each pays the imports of
torch, transformers, peft and Flower's client modules again: most of the fixed cost a message
pays on this project's CPUs (BENCHMARKS.md, "Flower deployment: the fixed cost each message pays").
Flower's own warm executors exist only for Kubernetes and for other task types.

`python -m fedtune.engines.flower.warm [flower-supernode arguments]` starts the SuperNode with:
  - a *zygote*: a child process that imports those modules once (`PRELOAD`; nothing is run, no
    thread is started: it refuses to serve otherwise), then forks one child per request; the child
    takes the requester's argv, environment, working directory and standard streams, reseeds the
    generators a fresh process would have seeded from the OS, and runs Flower's `flwr_clientapp()`
    unchanged;
  - a `flwr-clientapp` shim first on the SuperNode's PATH (`write_shim`): a light process that hands
    its arguments and streams to the zygote, forwards SIGINT / SIGTERM to the forked child, and
    exits with its exit code. Where the zygote cannot be reached it `exec`s Flower's own
    `flwr-clientapp`: never worse than a cold start.
With $FEDTUNE_WARM_APP naming the fedtune Flower app the node will run (`fedtune deploy` sets it),
the zygote also sets the node up for that app's config before it serves (`node_warm_up`: the
tokenizer, the node's shard, the base model with its adapter, the strategy and plan), so a
forked ClientApp finds them in memory, shared copy-on-write; a run of another config sets itself
up as before, and a failed set-up only costs the time it took (the zygote serves anyway).
The SuperNode itself is Flower's `flower-supernode`, run in this process with one change: its
message loop (`flwr.supernode.start_client_internal`, Flower 1.41) sleeps a fixed 3 s whenever it
pulled nothing and polls its own state every 0.5 s for the ClientApp's reply, neither settable; a
message arriving during the 3 s sleep waits for it, so those sleeps are capped at
$FEDTUNE_SUPERNODE_POLL seconds (`POLL_S`; `flower` keeps Flower's). What is polled, and when a
message is taken or a reply pushed, are Flower's; `tests/unit/test_warm_clientapp.py` fails if a
Flower release changes the sleeps this caps (flwr is pinned).
Every process stays in the SuperNode's process group (stopping the group stops them all), and the
zygote exits when the SuperNode does. What a ClientApp does, the messages and the records are
Flower's and fedtune's as before; only the imports are paid once per node instead of per message.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

SOCKET_ENV = "FEDTUNE_CLIENTAPP_ZYGOTE"  # the zygote's socket, read by the shim
APP_ENV = "FEDTUNE_WARM_APP"  # a fedtune Flower app dir: the zygote sets the node up for it first
WARM_DIR_ENV = "FEDTUNE_WARM_DIR"  # where `supernode` puts the shim and the socket (default: a temp dir)
PRELOAD = ("torch", "transformers", "peft", "flwr.supernode.cli.flwr_clientapp", "fedtune.engines.flower.client_app")
ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"  # what `flwr-clientapp` runs (its console script)
POLL_ENV = "FEDTUNE_SUPERNODE_POLL"  # cap on the SuperNode loop's sleeps, seconds ("flower": Flower's own)
POLL_S = 0.25  # the default cap: Flower's own deployment grid waits at most 0.25 s between pulls
PID = struct.Struct("!i")  # the forked child's pid, then its exit status, each 4 bytes
MAX_REQUEST = 1 << 20

SHIM = '''#!{python} -S
"""flwr-clientapp, started warm by fedtune's zygote (fedtune.engines.flower.warm); falls back to
Flower's own `flwr-clientapp` ({real}) when the zygote cannot be reached."""
import json, os, signal, socket, struct, sys

REAL = {real!r}
addr = os.environ.get({env!r}, "")
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(addr)
    req = json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(s, [struct.pack("!I", len(req)) + req], [0, 1, 2])
    got = s.recv(4, socket.MSG_WAITALL)
    if len(got) < 4:
        raise OSError("the zygote closed the connection")
except OSError:
    os.execv(REAL, [REAL, *sys.argv[1:]])
child = struct.unpack("!i", got)[0]
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda n, f: os.kill(child, n))
while True:
    try:
        got = s.recv(4, socket.MSG_WAITALL)
        break
    except InterruptedError:
        continue
code = struct.unpack("!i", got)[0] if len(got) == 4 else 1
if code < 0:  # the child died of a signal: so does the shim, as a cold process would have
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


def write_shim(bin_dir: Path, real: Path) -> Path:
    """A `flwr-clientapp` shim in `bin_dir` (put it first on the SuperNode's PATH); `real` is
    Flower's own `flwr-clientapp`, run where the zygote cannot be reached."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    tmp = bin_dir / ".flwr-clientapp.tmp"
    tmp.write_text(SHIM.format(python=sys.executable, real=str(real), env=SOCKET_ENV))
    tmp.chmod(0o755)
    tmp.replace(path)  # atomic: a SuperExec never runs a half-written shim
    return path


def _recv_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    """One request: a 4-byte length, the JSON, and the requester's fds 0, 1, 2."""
    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    if len(data) < 4:
        raise OSError("short request")
    (size,) = struct.unpack("!I", data[:4])
    if size > MAX_REQUEST:
        raise OSError(f"request of {size} bytes")
    body = data[4:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise OSError("request cut short")
        body += more
    return json.loads(body), fds


def _run_child(request: dict[str, object], fds: list[int], entry: str) -> int:
    """In the forked child: become the requester's process (argv, environment, working directory,
    streams) and run `entry` ('module:function', Flower's `flwr-clientapp`); its exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    env = request["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(str(request["cwd"]))
    argv = request["argv"]
    assert isinstance(argv, list)
    sys.argv = [str(a) for a in argv]

    import numpy as np
    import torch

    torch.seed()  # a fresh process's generators start from OS entropy; a forked one copies the zygote's
    np.random.seed()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))

    import importlib

    module, func = entry.split(":")
    try:
        getattr(importlib.import_module(module), func)()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (reported on the requester's stderr, as a cold process would)
        import traceback

        traceback.print_exc()
        code = 1
    return code


def listen(sock_path: Path) -> socket.socket:
    """The zygote's socket, bound before anything can ask for it (a shim that connects before the
    imports are done waits in the backlog)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path.unlink(missing_ok=True)
    listener.bind(str(sock_path))
    listener.listen(64)
    return listener


def node_warm_up(app_dir: str, node_config: str | None) -> None:
    """Set this node up for the fedtune app in `app_dir` (`client_app.preload_node`), with the
    node config Flower parses from `--node-config`. Torch runs on one thread meanwhile: a process
    that forks must not have started OpenMP's thread pool (its children would inherit a pool
    without its threads); the children start their own."""
    import time

    import torch
    from flwr.common.config import parse_config_args

    from fedtune.engines.flower import profile
    from fedtune.engines.flower.client_app import preload_node

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        what = preload_node(Path(app_dir), parse_config_args([node_config] if node_config else None))
    finally:
        torch.set_num_threads(threads)
    profile.SETUP.clear()  # paid here, by no message
    print(f"fedtune zygote: set up ahead in {time.perf_counter() - t0:.1f} s: {what}", file=sys.stderr, flush=True)


def _node_config(args: list[str]) -> str | None:
    """The value of flower-supernode's `--node-config` in `args`, if given."""
    for i, a in enumerate(args):
        if a == "--node-config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--node-config="):
            return a.split("=", 1)[1]
    return None


def serve(
    listener: socket.socket,
    parent_pid: int,
    preload: tuple[str, ...] = PRELOAD,
    entry: str = ENTRY,
    warm_up: Callable[[], None] | None = None,
) -> None:
    """The zygote: import `preload`, run `warm_up` (a failure is reported and served past), then
    fork one child running `entry` per request on `listener` until `parent_pid` is gone."""
    import importlib
    import selectors

    for name in preload:
        importlib.import_module(name)
    if warm_up is not None:
        try:
            import tqdm  # type: ignore[import-untyped]

            tqdm.tqdm.monitor_interval = 0  # a progress bar (datasets' map) would start tqdm's monitor thread
        except ImportError:
            pass
        try:
            warm_up()
        except Exception as e:  # noqa: BLE001 (never worse than without: each message sets itself up)
            print(f"fedtune zygote: no set-up ahead ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    if threading.active_count() != 1:  # forking a process with threads can deadlock its children
        names = [t.name for t in threading.enumerate()]
        print(f"fedtune zygote: threads after the imports and set-up ({names}); not serving", file=sys.stderr)
        listener.close()
        return
    waiting: dict[int, socket.socket] = {}  # forked child pid -> its requester's connection
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent_pid:
        for _key, _ in sel.select(timeout=0.2):
            conn, _addr = listener.accept()
            try:
                request, fds = _recv_request(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: never returns into the zygote's loop
                listener.close()
                conn.close()
                code = 1
                try:
                    code = _run_child(request, fds, entry)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            conn.sendall(PID.pack(pid))
            waiting[pid] = conn
        _reap(waiting)
    listener.close()


def _reap(waiting: dict[int, socket.socket]) -> None:
    """Tell each finished child's requester its exit code."""
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(PID.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            conn.close()


class CappedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop (`start_client_internal`,
    whose only use of `time` is `time.sleep`): every sleep lasts at most `cap` seconds."""

    def __init__(self, cap: float, sleep: Callable[[float], None]) -> None:
        self.cap = cap
        self._sleep = sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(min(seconds, self.cap))


def poll_cap(value: str | None) -> float | None:
    """The cap $FEDTUNE_SUPERNODE_POLL asks for (None: Flower's sleeps unchanged); ValueError
    naming the variable for anything else."""
    if value is None or value == "":
        return POLL_S
    if value == "flower":
        return None
    try:
        cap = float(value)
    except ValueError:
        cap = -1.0
    if not 0 < cap <= 3:
        raise ValueError(f"{POLL_ENV}={value!r}: give seconds in (0, 3], or 'flower' for Flower's own sleeps")
    return cap


def cap_supernode_polls(cap: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop in this process at `cap` seconds."""
    import time

    from flwr.supernode import start_client_internal as loop

    loop.time = CappedSleep(cap, time.sleep)  # type: ignore[assignment,attr-defined]


def supernode(args: list[str]) -> None:
    """Start the zygote as a child, then run `flower-supernode args` in this process with the shim
    first on PATH and its loop's sleeps capped (`cap_supernode_polls`; this process's pid stays
    the SuperNode's, so the zygote follows it). The shim and the socket go in $FEDTUNE_WARM_DIR
    (else a temp dir); the zygote removes them when it ends (the SuperNode gone, or SIGTERM to
    the group)."""
    import shutil

    bin_dir = Path(sys.executable).parent
    try:
        cap = poll_cap(os.environ.get(POLL_ENV))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    given = os.environ.pop(WARM_DIR_ENV, "")
    app = os.environ.pop(APP_ENV, "")
    warm_up = functools.partial(node_warm_up, app, _node_config(args)) if app else None
    home = Path(given) if given else Path(tempfile.mkdtemp(prefix="fedtune-warm-"))
    home.mkdir(parents=True, exist_ok=True)
    write_shim(home / "bin", bin_dir / "flwr-clientapp")
    sock = home / "zygote.sock"
    listener = listen(sock)  # bound before the SuperNode starts: no shim finds it missing
    me = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, lambda n, f: sys.exit(0))
        try:
            serve(listener, me, warm_up=warm_up)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            os._exit(0)
    listener.close()  # the SuperNode does not hold the zygote's socket
    os.environ[SOCKET_ENV] = str(sock)
    os.environ["PATH"] = f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.argv = [str(bin_dir / "flower-supernode"), *args]
    from flwr.supernode.cli import flower_supernode  # what the `flower-supernode` script runs

    if cap is not None:
        cap_supernode_polls(cap)
        print(f"fedtune: the SuperNode loop's sleeps capped at {cap} s ({POLL_ENV})", file=sys.stderr, flush=True)
    flower_supernode()
    sys.exit(0)


if __name__ == "__main__":
    supernode(sys.argv[1:])

"""LocalDeployment stops a process and every process of its group (a SuperNode starts its
`flower-superexec` in its own group), waiting until none is left: the CI failure this pins was a
`flower-superexec` still shutting down when `stop()` had already returned."""

import os
import sys
import time

import psutil
import pytest

from fedtune.engines.flower_deploy import LocalDeployment

# the child stands in for `flower-superexec`: in the leader's process group, it exits only some
# time after SIGTERM (or never, when it ignores the signal); the leader dies at once on SIGTERM
CHILD = """
import signal, sys, time
mode, ready = sys.argv[1], sys.argv[2]
if mode == "slow":
    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0)))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(ready, "w").write("ready")
time.sleep(120)
"""
LEADER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
open(sys.argv[3] + ".pid", "w").write(str(child.pid))
time.sleep(120)
"""


def group(pgid: int) -> set[int]:
    """Pids of the running (not zombie) processes of group `pgid`, read here, not by the code under test."""
    out = set()
    for q in psutil.process_iter(["status"]):
        try:
            if os.getpgid(q.pid) == pgid and q.info["status"] != psutil.STATUS_ZOMBIE:
                out.add(q.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("mode", ["slow", "ignores"])
def test_stop_waits_for_the_whole_process_group(tmp_path, mode) -> None:
    dep = LocalDeployment(tmp_path, 1, tls=False, grace=0.5 if mode == "ignores" else 10.0)
    ready = tmp_path / "ready"
    dep._spawn("leader", [sys.executable, "-c", LEADER, CHILD, mode, str(ready)])
    leader = dep.procs["leader"].pid
    deadline = time.monotonic() + 30
    while not (ready.exists() and (tmp_path / "ready.pid").exists()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child = int((tmp_path / "ready.pid").read_text())
    assert running(child) and group(leader) == {leader, child}

    dep.stop()

    assert not running(child), f"the group's child ({mode} on SIGTERM) outlived stop()"
    assert group(leader) == set() and dep.procs == {}

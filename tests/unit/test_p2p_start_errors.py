"""A peer whose libp2p daemon cannot start (its --initial-peers do not answer, a malformed
multiaddr, a port taken) gets a fedtune error naming the address and the fix, not hivemind's
traceback, and leaves no process behind."""

import socket
import time

import psutil
import pytest

from fedtune.errors import FedtuneError

pytest.importorskip("hivemind")
pytestmark = pytest.mark.p2p

NOBODY = "QmS2H7Yx3gpuqMUZrYdCGwqd9THWK5eYKaYFTPEMYKbxFJ"  # a well-formed peer id no process runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            # torch's shared-memory helper starts with the first tensor a process shares and lives with it
            if p.status() != psutil.STATUS_ZOMBIE and p.name() != "torch_shm_manager":
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def test_unreachable_initial_peers_malformed_multiaddrs_and_a_taken_port_are_named() -> None:
    from fedtune.engines.p2p import Swarm

    before = {p.pid for p in alive_children()}
    gone = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{NOBODY}"
    with pytest.raises(FedtuneError) as e:
        Swarm("s", "http", [gone], ["/ip4/127.0.0.1/tcp/0"])
    msg = str(e.value)
    assert f"peer 'http' reached none of its --initial-peers ({gone})" in msg
    assert "failed to connect to bootstrap peers" in msg and "start a new one" in msg

    with pytest.raises(FedtuneError, match='failed to parse multiaddr "127.0.0.1:4001": must begin with /'):
        Swarm("s", "http", ["127.0.0.1:4001"], ["/ip4/127.0.0.1/tcp/0"])

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FedtuneError) as e:
            Swarm("s", "http", [], [f"/ip4/127.0.0.1/tcp/{port}"])
    assert f"cannot listen on /ip4/127.0.0.1/tcp/{port}" in str(e.value) and "address already in use" in str(e.value)
    assert "Pick a free --port" in str(e.value)

    deadline = time.monotonic() + 10
    while (left := [p for p in alive_children() if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]

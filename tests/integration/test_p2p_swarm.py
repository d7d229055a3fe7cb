"""Two hivemind `Swarm` memberships in this process on loopback: how a peer judges another one down."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedtune.engines.p2p import LOST_GRACE_SECONDS, Swarm

pytestmark = [pytest.mark.p2p, pytest.mark.xdist_group("p2p")]
pytest.importorskip("hivemind")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_a_peer_only_messaged_is_judged_down_once_its_connection_is_gone() -> None:
    # Arrange: a and b exchange one message each; a never looked at its connections while b was
    # up (every barrier found b already there), as when the swarm runs in step before a kill
    a = Swarm("test-down", "a", [], LOOPBACK)
    b = Swarm("test-down", "b", a.maddrs(), LOOPBACK)
    closed: list[Swarm] = []
    try:
        deadline = time.monotonic() + 30
        with ThreadPoolExecutor(2) as pool:  # each waits for the other's registration
            joined = list(pool.map(lambda s: set(s.join(["a", "b"], deadline)), [a, b]))
        assert joined == [{"a", "b"}, {"a", "b"}]
        assert a.send("b", "update", 1, b"x" * 10, 10.0) is None
        assert b.send("a", "update", 1, b"y" * 10, 10.0) is None
        assert b.receive("update", 1, ["a"], time.monotonic() + 10) == {"a": b"x" * 10}
        assert a.receive("update", 1, ["b"], time.monotonic() + 10) == {"b": b"y" * 10}
        # Act: b goes away (its daemon with it)
        b.close()
        closed.append(b)
        waited = time.monotonic()
        while "b" not in a.down(["b"]) and time.monotonic() - waited < 10 * LOST_GRACE_SECONDS:
            time.sleep(0.1)
        # Assert: judged down after the grace period, not left to the round's deadline
        assert a.down(["b"]) == {"b"}
        assert time.monotonic() - waited >= LOST_GRACE_SECONDS
    finally:
        for s in (b, a):
            if s not in closed:
                s.close()

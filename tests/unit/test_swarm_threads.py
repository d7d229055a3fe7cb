"""A local swarm splits the machine's cores between its peer processes (`recipes/swarm.py`): N
peers with two intra-op threads each on 2 cores oversubscribe them, as the tests' workers did."""

import subprocess

import pytest

from fedtune.recipes import swarm


@pytest.mark.parametrize("cores,peers,want", [(2, 9, 1), (2, 1, 2), (16, 4, 4), (16, 3, 5), (1, 3, 1)])
def test_each_peer_gets_its_share_of_the_cores(monkeypatch, cores, peers, want) -> None:
    monkeypatch.setattr(swarm.os, "cpu_count", lambda: cores)
    assert swarm.peer_threads(peers) == want


def test_a_peer_process_gets_the_thread_count_unless_the_user_set_one(monkeypatch, tmp_path) -> None:
    seen = []

    class Fake:
        def __init__(self, cmd, **kw):
            seen.append(kw["env"])

    monkeypatch.setattr(subprocess, "Popen", Fake)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    swarm.start_peer(tmp_path / "c.yaml", "a", tmp_path, "s", [], threads=3)
    assert seen[-1]["OMP_NUM_THREADS"] == "3" and seen[-1]["MKL_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    swarm.start_peer(tmp_path / "c.yaml", "b", tmp_path, "s", [], threads=3)
    assert seen[-1]["OMP_NUM_THREADS"] == "2"  # the user's own setting wins

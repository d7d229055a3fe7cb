"""The client-state store: what a client keeps between rounds round-trips through its files,
versions answer "the state before round r", memory stays bounded, and a process killed while
writing leaves the previous version whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from fedtune.client.run import ClientState
from fedtune.client.store import ClientStateStore


def state(seed: int) -> ClientState:
    g = torch.Generator().manual_seed(seed)
    return ClientState(
        private={"expert.A": torch.randn(3, 4, generator=g)},
        up_codec={"residual": torch.randn(5, generator=g)},
        down_codec=None,
        rounds=seed,
        secagg_key=bytes([seed]) * 32,
    )


def same(a: ClientState, b: ClientState) -> bool:
    """Equal in everything the store keeps; the secure-aggregation private key is never written, so
    a state read back from disk has none (it lives in memory for its round only)."""
    return (
        a.private.keys() == b.private.keys()
        and all(torch.equal(a.private[k], b.private[k]) for k in a.private)
        and torch.equal(a.up_codec["residual"], b.up_codec["residual"])
        and (a.down_codec, a.rounds) == (b.down_codec, b.rounds)
        and a.secagg_key == b""
    )


def test_states_round_trip_through_disk_by_version(tmp_path) -> None:
    store = ClientStateStore(tmp_path, ClientState())
    for rnd in (1, 2, 3):
        store.put("c/1", state(rnd), rnd)
    fresh = ClientStateStore(tmp_path, ClientState())  # a new process: nothing cached
    assert same(fresh.get("c/1"), state(3))
    assert same(fresh.get("c/1", before=3), state(2))  # a replayed round 3 starts from round 2
    assert fresh.versions("c/1") == [2, 3]  # older versions pruned
    assert fresh.get("c/1", before=2) is fresh.initial  # pruned: nothing written before round 2 kept
    assert fresh.get("never-trained") is fresh.initial


def test_memory_holds_at_most_cache_size_states(tmp_path) -> None:
    store = ClientStateStore(tmp_path, ClientState(), cache_size=2)
    for i in range(5):
        store.put(f"c{i}", state(i + 1), 1)
    assert len(store._cache) == 2
    assert same(store.get("c0"), state(1))  # evicted, read back from its file
    assert len(store._cache) == 2


def test_a_kill_during_a_write_keeps_the_previous_version(tmp_path) -> None:
    ClientStateStore(tmp_path, ClientState()).put("c", state(1), 1)
    child = textwrap.dedent(
        f"""
        import os, signal, torch
        from fedtune.client.run import ClientState
        from fedtune.client.store import ClientStateStore
        real = torch.save
        def half_then_die(obj, f):  # half of the file reaches the disk, then SIGKILL
            real(obj, f)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_then_die
        ClientStateStore({str(tmp_path)!r}, ClientState()).put("c", ClientState(rounds=99), 2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    store = ClientStateStore(tmp_path, ClientState())
    assert store.versions("c") == [1]  # the half-written round 2 is not a version
    assert same(store.get("c"), state(1))
    store.put("c", state(2), 2)  # the next attempt writes it whole
    assert same(ClientStateStore(tmp_path, ClientState()).get("c"), state(2))


def test_a_peers_model_and_push_sum_weight_round_trip_by_version(tmp_path) -> None:
    """A decentralized peer's x and w live in its ClientState: written per round, read back by a
    fresh process, and z = x / w is its model."""
    from fedtune.client.run import PeerState

    store = ClientStateStore(tmp_path, ClientState())
    for rnd, w in ((1, 0.5), (2, 1.5)):
        store.put("p", ClientState(peer=PeerState({"m.lora_B.weight": torch.full((2, 2), float(rnd))}, w)), rnd)
    fresh = ClientStateStore(tmp_path, ClientState())
    newest, before = fresh.get("p"), fresh.get("p", before=2)
    assert newest.peer is not None and before.peer is not None
    assert newest.peer.w == 1.5 and before.peer.w == 0.5
    torch.testing.assert_close(newest.peer.x["m.lora_B.weight"], torch.full((2, 2), 2.0))
    torch.testing.assert_close(before.peer.model()["m.lora_B.weight"], torch.full((2, 2), 2.0))  # 1 / 0.5
    assert fresh.get("never-a-peer").peer is None

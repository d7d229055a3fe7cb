"""A peer's transport over hivemind (the only module that imports it): hivemind's DHT for
discovery, membership and round barriers, and libp2p binary streams (`P2P.add_binary_stream_handler`
/ `call_binary_stream_handler`, framed by `P2P.send_raw_data`) for the exact serialized bytes of
each peer message. No maths and no fedtune state here: bytes in, bytes out, with deadlines.

DHT records live under `<swarm>/<key>` with one subkey per peer, so a barrier is "read the key
until the expected peers' subkeys are there, or the deadline passes". A peer registers its libp2p
id under `<swarm>/members`; a sender looks the receiver's id up there and opens a stream to it.
Known trouble (hivemind's own issues): peers started together may form separate DHTs, so the
first peer starts alone and the others are given its visible multiaddrs (`--initial-peers`).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from fedtune.errors import FedtuneError

MESSAGE_PROTOCOL = "fedtune.peer-message"
ACK = b"\x06"
DHT_TTL = 24 * 3600.0  # seconds a swarm's DHT records live: longer than any run
POLL_SECONDS = 0.1
# hivemind's DHT waits 3 s for a node: a live node busy training on a loaded CPU may take longer
# (stores are also retried); its blacklist (5 s, doubling) keeps a killed peer's node from stalling reads
DHT_OPTIONS = {"wait_timeout": 5.0, "bootstrap_timeout": 30.0}
STORE_TRIES = 5
LOST_GRACE_SECONDS = 2.0  # a peer whose connection is gone this long is down (not waited for)


def require_hivemind() -> Any:
    """hivemind, or a clear error naming the extra that installs it."""
    try:
        import hivemind
    except ImportError as e:  # the p2p extra is optional
        raise FedtuneError("peer processes need hivemind: pip install -e '.[p2p]' (pins hivemind==1.1.12)") from e
    return hivemind


def start_error(me: str, initial_peers: Sequence[str], host_maddrs: Sequence[str], reason: str) -> str:
    """What went wrong when a peer's libp2p daemon did not start, and the fix: `reason` is hivemind's
    "Daemon failed to start: <the daemon's last log line>"."""
    why = re.sub(r"^Daemon failed to start: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", reason.strip())
    if "bootstrap peers" in why:
        return (
            f"peer {me!r} reached none of its --initial-peers ({', '.join(initial_peers)}): {why}. Give the "
            "multiaddrs of a peer that is running now (a peer prints them when it starts and writes them to "
            "RUN_DIR/peers/<id>/maddrs.txt); a swarm whose peers have all finished cannot be joined: start a new "
            "one, its first peer with no --initial-peers"
        )
    if "parse multiaddr" in why:
        return (
            f"peer {me!r}: {why}. A multiaddr looks like /ip4/192.0.2.1/tcp/31337/p2p/<peer id> for "
            "--initial-peers (copy it from the running peer's output) and /ip4/0.0.0.0/tcp/31337 to listen on"
        )
    if "listen" in why:
        return (
            f"peer {me!r} cannot listen on {', '.join(host_maddrs)}: {why}. Pick a free --port (0: any free "
            "port) or another --host"
        )
    return (
        f"peer {me!r}: hivemind's libp2p daemon did not start ({why}); --initial-peers "
        f"{' '.join(initial_peers) or '(none)'}, listening on {', '.join(host_maddrs)}"
    )


class Swarm:
    """One peer's membership in a swarm: a hivemind DHT node (its own process, with its p2pd
    daemon) and a replica of its P2P client in this process, on an event loop in a thread.

    Args:
        swarm: the swarm's name (DHT key prefix; the run's token keeps two runs apart).
        me: this peer's id (a client id of the config).
        initial_peers: multiaddrs of peers already in the swarm ([] for the first peer).
        host_maddrs: where this peer listens (e.g. /ip4/0.0.0.0/tcp/31337).
    """

    def __init__(self, swarm: str, me: str, initial_peers: Sequence[str], host_maddrs: Sequence[str]):
        hm = require_hivemind()
        from hivemind.p2p import P2P

        self.swarm, self.me = swarm, me
        self._P2P = P2P
        self._lock = threading.Condition()
        self._inbox: dict[tuple[str, int, str], bytes] = {}  # (kind, round, sender) -> payload
        self._ids: dict[str, Any] = {}  # peer -> PeerID
        self._was_connected: set[str] = set()  # libp2p ids this peer's daemon has been connected to
        self._lost_since: dict[str, float] = {}  # libp2p id -> when its connection was first seen gone
        from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

        try:
            peers, maddrs = list(initial_peers), list(host_maddrs)
            self.dht = hm.DHT(initial_peers=peers, host_maddrs=maddrs, start=True, **DHT_OPTIONS)
        except P2PDaemonError as e:
            raise FedtuneError(start_error(me, initial_peers, host_maddrs, str(e))) from e
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedtune-p2p", daemon=True)
        self._thread.start()
        self._p2p = self._run(self.dht.replicate_p2p(), 60.0)
        self._run(self._p2p.add_binary_stream_handler(f"{MESSAGE_PROTOCOL}/{swarm}", self._on_stream), 30.0)

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def maddrs(self) -> list[str]:
        """This peer's visible multiaddrs (what other peers pass as --initial-peers)."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    # -- DHT: records and barriers -------------------------------------------------------------
    def announce(self, key: str, value: Any) -> None:
        """Store `value` (msgpack-able) under <swarm>/<key>, subkey = this peer."""
        from hivemind.utils import get_dht_time

        for attempt in range(STORE_TRIES):
            if self.dht.store(f"{self.swarm}/{key}", value, get_dht_time() + DHT_TTL, subkey=self.me):
                return
            time.sleep(1.0 + attempt)
        raise FedtuneError(
            f"peer {self.me!r}: the DHT refused to store {key!r} {STORE_TRIES} times (no reachable DHT node); "
            "check that the --initial-peers are up and reachable"
        )

    def read(self, key: str) -> dict[str, Any]:
        """Every peer's value under <swarm>/<key> ({peer: value}; {} when none)."""
        found = self.dht.get(f"{self.swarm}/{key}", latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {str(k): v.value for k, v in found.value.items()}

    def gather(self, key: str, expected: Collection[str], deadline: float, skip_down: bool = False) -> dict[str, Any]:
        """Wait until every expected peer has announced `key` or `deadline` (time.monotonic())
        passes: the barrier. With `skip_down`, a peer that is `down` is not waited for. Returns
        the values found (a late peer is absent)."""
        while True:
            got = self.read(key)
            waiting = set(expected) - set(got) - (self.down(set(expected) - set(got)) if skip_down else set())
            if not waiting or time.monotonic() >= deadline:
                return {p: v for p, v in got.items() if p in expected}
            time.sleep(POLL_SECONDS)

    def down(self, peers: Collection[str]) -> set[str]:
        """The peers whose registered libp2p id was connected to this peer's daemon (seen connected
        here, or a message exchanged with it) and has been disconnected for LOST_GRACE_SECONDS (a
        killed peer); a restarted peer registers a new id and is up again once `refresh` reads it.
        A peer never connected to is not judged."""
        if not peers:
            return set()
        connected = {str(p.peer_id.to_base58()) for p in self._run(self._p2p.list_peers(), 10.0)}
        with self._lock:  # also filled by every message sent or received (the event loop's thread)
            self._was_connected |= connected
            was_connected = set(self._was_connected)
        now, out = time.monotonic(), set()
        for p in peers:
            pid = self._ids[p].to_base58() if p in self._ids else None
            if pid is None or pid not in was_connected or pid in connected:
                if pid is not None:
                    self._lost_since.pop(pid, None)
                continue
            if now - self._lost_since.setdefault(pid, now) >= LOST_GRACE_SECONDS:
                out.add(p)
        return out

    def join(self, peers: Collection[str], deadline: float) -> dict[str, str]:
        """Register this peer's libp2p id and wait for every peer's (the membership before round 1)."""
        self.announce("members", self.dht.peer_id.to_base58())
        found = self.gather("members", peers, deadline)
        self._remember(found)
        return found

    def _remember(self, members: dict[str, str]) -> None:
        from hivemind.p2p import PeerID

        for p, pid in members.items():
            self._ids[p] = PeerID.from_base58(pid)

    # -- streams: exact payload bytes to named peers ---------------------------------------------
    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = json.loads(await self._P2P.receive_raw_data(reader))
            payload = await self._P2P.receive_raw_data(reader)
            with self._lock:
                self._was_connected.add(str(info.peer_id.to_base58()))
                self._inbox[(str(header["kind"]), int(header["round"]), str(header["sender"]))] = payload
                self._lock.notify_all()
            writer.write(ACK)  # the sender counts a message as delivered only on this byte
            await writer.drain()
        finally:
            writer.close()

    async def _send(self, peer: str, header: bytes, payload: bytes) -> None:
        _, reader, writer = await self._p2p.call_binary_stream_handler(self._ids[peer], self._protocol)
        try:
            await self._P2P.send_raw_data(header, writer)
            await self._P2P.send_raw_data(payload, writer)
            # closing at once can reset the libp2p stream before the daemon forwarded the bytes:
            # wait for the receiver's acknowledgement (it has the whole message in its inbox)
            if await reader.readexactly(len(ACK)) != ACK:
                raise ConnectionError(f"peer {peer!r} did not acknowledge the message")
        finally:
            writer.close()

    @property
    def _protocol(self) -> str:
        return f"{MESSAGE_PROTOCOL}/{self.swarm}"

    def send(self, peer: str, kind: str, rnd: int, payload: bytes, timeout: float) -> str | None:
        """Send `payload` to `peer` over a libp2p stream; None when delivered to its daemon, else
        why not (a down peer is an expected failure, returned as a value)."""
        header = json.dumps({"kind": kind, "round": rnd, "sender": self.me}).encode()
        why = None
        for _ in range(2):  # a restarted peer has a new libp2p id: look it up again and retry once
            if peer not in self._ids:
                self.refresh()
            if peer not in self._ids:
                return f"peer {peer!r} never joined the swarm"
            try:
                self._run(asyncio.wait_for(self._send(peer, header, payload), timeout), timeout + 5.0)
                with self._lock:  # a peer we exchanged a message with is judged once its connection is gone
                    self._was_connected.add(self._ids[peer].to_base58())
                return None
            except Exception as e:  # a dead peer: connection refused, reset or timed out
                why = f"sending to peer {peer!r} failed: {type(e).__name__}: {e}".rstrip(": ")
                self._ids.pop(peer, None)
        return why

    def refresh(self) -> None:
        """Read every peer's current libp2p id again (a restarted peer registers a new one)."""
        self._remember(self.read("members"))

    def receive(
        self,
        kind: str,
        rnd: int,
        senders: Collection[str],
        deadline: float,
        hopeless: Callable[[set[str]], bool] | None = None,
    ) -> dict[str, bytes]:
        """The `kind` messages of round `rnd` from `senders` that arrive before `deadline`
        (time.monotonic()), or until `hopeless(missing senders)` says none will come; taken out
        of the inbox."""
        want = {(kind, rnd, s) for s in senders}
        while True:
            with self._lock:
                left = deadline - time.monotonic()
                if want <= set(self._inbox) or left <= 0:
                    break
                self._lock.wait(min(left, 1.0))
                if want <= set(self._inbox):
                    break
            if hopeless is not None and hopeless({k[2] for k in want - set(self._inbox)}):
                break
        with self._lock:
            return {k[2]: self._inbox.pop(k) for k in sorted(want & set(self._inbox))}

    def close(self) -> None:
        """Stop the stream handler, the event loop and the DHT process (and its p2pd)."""
        try:
            self._run(self._p2p.remove_binary_stream_handler(self._protocol), 5.0)
            self._run(self._p2p.shutdown(), 5.0)
        except Exception:  # closing after a peer or the daemon died: nothing left to stop here
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self.dht.shutdown()

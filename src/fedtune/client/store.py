"""Where a client's state lives between rounds: files on the client's own disk, one version per
round it trained in, with a small in-memory cache.

A round-r job reads the newest version written before round r and writes version r, so a server
that resumes from an older checkpoint (killed after some clients wrote round r) replays round r
from the right state: resume == uninterrupted. Old versions are pruned (at most two per client).
In-process every client's folder is under the run directory; on Flower each SuperNode keeps its
own (never on the server).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fedtune.client.run import ClientState, PeerState
from fedtune.files import write_atomic_with

_VERSION = re.compile(r"^round-(\d+)\.pt$")


class ClientStateStore:
    """ClientState per client id, versioned by round, on disk under `root`."""

    def __init__(self, root: Path, initial: ClientState, cache_size: int = 64):
        self.root = Path(root)
        self.initial = initial
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int], ClientState] = OrderedDict()

    def _dir(self, cid: str) -> Path:
        return self.root / cid.replace("/", "_")

    def versions(self, cid: str) -> list[int]:
        d = self._dir(cid)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _VERSION.match(p.name)))

    def get(self, cid: str, before: int | None = None) -> ClientState:
        """The newest state written before round `before` (default: the newest), or the initial one."""
        found = [v for v in self.versions(cid) if before is None or v < before]
        if not found:
            return self.initial
        key = (cid, found[-1])
        if key not in self._cache:
            raw: dict[str, Any] = torch.load(self._dir(cid) / f"round-{found[-1]}.pt", weights_only=False)
            peer = raw.pop("peer", None)
            self._remember(key, ClientState(**raw, peer=None if peer is None else PeerState(peer["x"], peer["w"])))
        self._cache.move_to_end(key)
        return self._cache[key]

    def put(self, cid: str, state: ClientState, rnd: int) -> None:
        """Write version `rnd` atomically, then drop versions older than the one it came from."""
        d = self._dir(cid)
        d.mkdir(parents=True, exist_ok=True)
        raw = {
            "private": state.private,
            "up_codec": state.up_codec,
            "down_codec": state.down_codec,
            "rounds": state.rounds,
            "peer": None if state.peer is None else {"x": state.peer.x, "w": state.peer.w},
        }  # never the secure-aggregation private key: it lives in memory for its round only
        write_atomic_with(d / f"round-{rnd}.pt", lambda f: torch.save(raw, f))
        self._remember((cid, rnd), state)
        older = [v for v in self.versions(cid) if v < rnd]
        for v in older[:-1]:  # keep the version this round started from (a resume may need it)
            os.unlink(d / f"round-{v}.pt")
            self._cache.pop((cid, v), None)

    def _remember(self, key: tuple[str, int], state: ClientState) -> None:
        self._cache[key] = state
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

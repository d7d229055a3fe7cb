"""Opt-in timing of Flower messages, for `bench/flower_fixed_cost.py`: with `FEDTUNE_PROFILE` set to
a file, each ClientApp process and the server append one JSON line per message (wall-clock times,
so lines from different processes on one machine line up). Off, it costs one dict lookup."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "FEDTUNE_PROFILE"
SETUP: dict[str, float] = {}  # seconds of each set-up phase this process ran (empty once set up)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a set-up phase into SETUP (added up if it runs again)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        SETUP[name] = SETUP.get(name, 0.0) + time.perf_counter() - t0


def record(**fields: Any) -> None:
    """Append one JSON line to $FEDTUNE_PROFILE (one `write` of an O_APPEND file: lines of
    concurrent processes never interleave); nothing when it is unset."""
    path = os.environ.get(ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def process_start() -> float:
    """When this process started (wall clock), to 10 ms: its start tick in /proc counted back from
    the boot clock (psutil's `create_time` adds the ticks to /proc/stat's whole-second boot time,
    up to 1 s off)."""
    stat = Path("/proc/self/stat").read_text()
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks since boot
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")


def client_message(kind: str, client: str, started: float) -> None:
    """A ClientApp's line: when its process started, when the handler started and ended, and the
    set-up phases this message paid (none when the process had set up already)."""
    if not os.environ.get(ENV):
        return
    end = time.time()
    record(side="client", kind=kind, client=client, created=process_start(), clock="boottime", handler0=started,
           handler1=end, setup=dict(SETUP))  # fmt: skip
    SETUP.clear()

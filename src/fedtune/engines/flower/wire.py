"""Wire format: a payload is the codec's bytes as one uint8 Flower array, so bytes are counted
exactly as in-process; the experiment config travels as YAML in the run config. Imported by the
ClientApp too: nothing here imports the server side."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtune.config import ExperimentConfig, config_from_dict

if TYPE_CHECKING:
    from flwr.serverapp import Grid

CONFIG_KEY = "fedtune-config"
NUM_CLIENTS_KEY = "fedtune-num-clients"


def flower_defaults() -> None:
    """Environment Flower and Ray read (set by entry points, never at import): no update check, no
    runtime dependency installation (it would pull a multi-GB CUDA torch)."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


PULL_INTERVAL = 0.1
"""Seconds between the server's pulls for replies: the interval of Flower's own in-memory grid
(simulation); Flower's deployment grid waits 3 s between pulls, which every message paid."""


def send_and_receive(grid: Any, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """`Grid.send_and_receive` on Flower's public `push_messages` / `pull_messages`, pulling every
    `PULL_INTERVAL` s: push every message, pull until each has its reply or `timeout` s have
    passed (None: no limit), return the replies that came. A message the SuperLink did not accept
    (no id) can get no reply and is not waited for; the replies returned are Flower's."""
    ids = {i for i in grid.push_messages(messages) if i}
    end = time.time() + (timeout if timeout is not None else 0.0)
    out: list[Message] = []
    while timeout is None or time.time() < end:
        replies = list(grid.pull_messages(ids))
        out.extend(replies)
        ids.difference_update(r.metadata.reply_to_message_id for r in replies)
        if not ids:
            break
        time.sleep(PULL_INTERVAL)
    return out


class PollingGrid:
    """A Grid whose `send_and_receive` pulls every `PULL_INTERVAL` s (also inside Flower's SecAgg+
    workflow, which calls it); the rest of the Grid API unchanged."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return send_and_receive(self._grid, messages, timeout)


def to_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord(array_dict={"payload": Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def from_record(record: ArrayRecord) -> bytes:
    return bytes(record["payload"].numpy().tobytes())


def config_from_yaml(text: str) -> ExperimentConfig:
    import yaml

    return config_from_dict(yaml.safe_load(text))


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: array data, bytes and strings at their length, numbers 8."""

    def size(v: Any) -> int:
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8

    total = 0
    for rec in content.array_records.values():
        total += sum(len(a.data) for a in rec.values())
    for crec in content.config_records.values():
        total += sum(size(v) for v in crec.values())
    for mrec in content.metric_records.values():
        total += sum(size(v) for v in mrec.values())
    return total


class CountingGrid:
    """A Grid that counts the bytes of every message to, and reply from, each node."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:  # the rest of the Grid API, unchanged
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        msgs = list(messages)
        for m in msgs:
            self.down[m.metadata.dst_node_id] = self.down.get(m.metadata.dst_node_id, 0) + content_bytes(m.content)
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        for r in replies:
            if not r.has_error():
                src = r.metadata.src_node_id
                self.up[src] = self.up.get(src, 0) + content_bytes(r.content)
        return replies

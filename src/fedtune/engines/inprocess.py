"""The default engine: one process, the base model loaded once, clients run in turn with their
adapters swapped in and out. Payloads are really encoded and decoded, so bytes are measured."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from fedtune.client.round import client_round
from fedtune.client.train import TrainSpec
from fedtune.data.blocks import Shard
from fedtune.seeding import torch_generator
from fedtune.types import AdapterState, ClientFailure, ClientUpdate

StepCallback = Callable[[str, int, int, float], None]


class InProcessEngine:
    """Runs client rounds sequentially on one shared model."""

    def __init__(
        self, model: Any, shards: Mapping[str, Shard], codec: Any, spec: TrainSpec, seed: int, penalty: Any = None
    ):
        self.model = model
        self.penalty = penalty
        self.shards = shards
        self.codec = codec
        self.spec = spec
        self.seed = seed

    def run_clients(
        self,
        rnd: int,
        payloads: Mapping[str, bytes],
        codec_states: dict[str, Any],
        on_step: StepCallback | None = None,
    ) -> tuple[list[ClientUpdate | ClientFailure], dict[str, Any]]:
        """Each client decodes its downlink payload, trains, and encodes its delta (uplink).

        Returns the replies and the updated per-client codec states.
        """
        replies: list[ClientUpdate | ClientFailure] = []
        states = dict(codec_states)
        for cid, payload in payloads.items():
            shard = self.shards[cid]
            t0 = time.perf_counter()
            received, _ = self.codec.decode(payload, None)
            cb = (lambda s, n, loss, cid=cid: on_step(cid, s, n, loss)) if on_step else None
            delta, metrics = client_round(
                self.model, received, shard, self.spec, self.seed, rnd, cb, self.penalty
            )
            up, states[cid] = self.codec.encode(delta, states.get(cid), torch_generator(self.seed, "codec-up", rnd, cid))
            metrics["client_seconds"] = time.perf_counter() - t0
            replies.append(
                ClientUpdate(cid, _decode(self.codec, up), shard.num_examples, metrics, len(up), len(payload))
            )
        return replies, states


def _decode(codec: Any, payload: bytes) -> AdapterState:
    """The server sees exactly what was on the wire."""
    tensors, _ = codec.decode(payload, None)
    return tensors

"""The default engine: one process, the base model loaded once, clients run in turn with their
adapters swapped in and out. Payloads are really encoded and decoded, so bytes are measured."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from fedtune.client.round import client_round
from fedtune.client.train import TrainSpec
from fedtune.data.blocks import Shard
from fedtune.evaluation.metrics import evaluate_blocks
from fedtune.models.adapters import set_state_
from fedtune.seeding import torch_generator
from fedtune.types import AdapterState, ClientFailure, ClientUpdate

StepCallback = Callable[[str, int, int, float], None]


class InProcessEngine:
    """Runs client rounds sequentially on one shared model."""

    def __init__(
        self,
        model: Any,
        shards: Mapping[str, Shard],
        codec: Any,
        spec: TrainSpec,
        seed: int,
        penalty: Any = None,
        *,
        eval_shards: Mapping[str, Shard] | None = None,
        eval_batch_size: int = 8,
    ):
        self.model = model
        self.penalty = penalty
        self.eval_shards = eval_shards if eval_shards is not None else shards
        self.eval_batch_size = eval_batch_size
        self.collected_bytes = 0
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
            delta, metrics = client_round(self.model, received, shard, self.spec, self.seed, rnd, cb, self.penalty)
            up, states[cid] = self.codec.encode(
                delta, states.get(cid), torch_generator(self.seed, "codec-up", rnd, cid)
            )
            metrics["client_seconds"] = time.perf_counter() - t0
            replies.append(
                ClientUpdate(cid, _decode(self.codec, up), shard.num_examples, metrics, len(up), len(payload))
            )
        return replies, states

    def evaluate(self, states: Mapping[str, AdapterState]) -> dict[str, dict[str, float]]:
        """Each client's test loss/ppl under the state given for it."""
        return evaluate_states(self.model, self.eval_shards, states, self.eval_batch_size, self.spec.bf16)


def evaluate_states(
    model: Any, shards: Mapping[str, Shard], states: Mapping[str, AdapterState], batch_size: int, bf16: bool
) -> dict[str, dict[str, float]]:
    """Test loss/ppl of each client under the adapter state given for it."""
    out: dict[str, dict[str, float]] = {}
    current: AdapterState | None = None
    for cid, state in states.items():
        if state is not current:  # global strategies share one state: load it once
            set_state_(model, state)
            current = state
        out[cid] = evaluate_blocks(model, shards[cid].test, batch_size, bf16)
    return out


def _decode(codec: Any, payload: bytes) -> AdapterState:
    """The server sees exactly what was on the wire."""
    tensors, _ = codec.decode(payload, None)
    return tensors

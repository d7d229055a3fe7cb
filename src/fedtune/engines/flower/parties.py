"""trust_distill on Flower: each party's own model lives on its SuperNode (`client_app.py`'s
party handlers); the server sends three kinds of message per round and never sees a weight:

    query.predict   -> the party's encoded top-k predictions on the public corpus (uplink payload)
    train.distill   <- its pseudo-label payload (downlink; none in warm-up rounds), -> its losses
    evaluate.party  -> its own model's metrics on its own splits

Each party keeps a version of its adapter per round in its own state store, so a resumed
ServerApp replays a round from the version before it (resume == uninterrupted)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.engines.flower.wire import from_record, to_record
from fedtune.types import AdapterState

PREDICT, DISTILL, EVALUATE = "query.predict", "train.distill", "evaluate.party"


class FlowerParties:
    """The `Parties` of a Flower run (`engines/parties.py`): messages to the parties' SuperNodes."""

    def __init__(self, engine: Any, public_positions: int):
        self.engine = engine  # FlowerEngine: node ids, timeouts, restarted nodes
        self.public_positions = public_positions

    def _ask(self, kind: str, rnd: int, payloads: Mapping[str, bytes] | None = None) -> dict[str, Message | str]:
        contents = {}
        for c in self.engine.node_of:
            content = RecordDict({"config": ConfigRecord({"round": rnd, "run": self.engine.run_token})})
            if payloads is not None and c in payloads:
                content["payload"] = to_record(payloads[c])
            contents[c] = content
        return self.engine.send(kind, contents, rnd)  # type: ignore[no-any-return]

    def predict(self, rnd: int) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for c, reply in self._ask(PREDICT, rnd).items():
            out[c] = reply if isinstance(reply, str) else from_record(reply.content.array_records["payload"])
        return out

    def train(self, rnd: int, labels: Mapping[str, bytes]) -> dict[str, dict[str, float] | str]:
        out: dict[str, dict[str, float] | str] = {}
        for c, reply in self._ask(DISTILL, rnd, labels).items():
            out[c] = reply if isinstance(reply, str) else _numbers(reply)
        return out

    def evaluate(self, rnd: int) -> dict[str, dict[str, float]]:
        return {c: _numbers(r) for c, r in self._ask(EVALUATE, rnd).items() if not isinstance(r, str)}

    def saved(self) -> dict[str, AdapterState]:
        return {}  # every party's versions are on its own disk

    def restore_(self, saved: Mapping[str, AdapterState]) -> None:
        return None


def _numbers(reply: Message) -> dict[str, float]:
    return {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]

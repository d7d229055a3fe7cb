"""A trust_distill party on its SuperNode: its own model (`strategy.party(n)` for partition n),
its own data, the public corpus built from its name, and a version of its adapter per round in
its own state store (`ClientStateStore`, the same layout as a client's state). The handlers in
`client_app.py` call these; the server side is `parties.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.run import ClientState
from fedtune.client.store import ClientStateStore
from fedtune.data.blocks import Shard
from fedtune.engines.flower import profile
from fedtune.engines.flower.client_app import node_base, node_shard


@dataclass
class PartyRuntime:
    """What a party's SuperNode keeps between messages (its model is loaded once per process;
    every message first loads the adapter version the round starts from)."""

    client_id: str
    train: Shard  # its training data (poisoned in an attack simulation)
    shard: Shard  # its own splits, scored clean
    model: Any
    work: Any  # PartyWork
    state_root: Path
    initial: dict[str, Any]
    stores: dict[str, ClientStateStore]

    def store(self, run: str) -> ClientStateStore:
        if run not in self.stores:
            self.stores[run] = ClientStateStore(self.state_root / (run or "default"), ClientState(private=self.initial))
        return self.stores[run]

    def load_(self, run: str, before: int) -> None:
        """The party's adapter as it was after its newest round before `before`."""
        from fedtune.models.adapters import set_state_

        set_state_(self.model, self.store(run).get(self.client_id, before=before).private)

    def save(self, run: str, rnd: int) -> None:
        from fedtune.models.adapters import get_state

        self.store(run).put(self.client_id, ClientState(private=get_state(self.model)), rnd)


_PARTIES: dict[tuple[str, int, str], PartyRuntime] = {}


def party_runtime(cfg_yaml: str, partition_id: int, state_root: str) -> PartyRuntime:
    key = (cfg_yaml, partition_id, state_root)
    if key not in _PARTIES:
        from fedtune import components
        from fedtune.engines.faults import attackers, corrupt_shard
        from fedtune.engines.federation import run_precision
        from fedtune.engines.parties import build_party_model, party_work
        from fedtune.models.adapters import get_state
        from fedtune.strategies.trust_distill import TrustDistill

        root = Path(state_root).expanduser()
        ids, shard = node_shard(cfg_yaml, partition_id, root)
        cfg, model_dir, tokenizer = node_base(cfg_yaml)
        cfg, _, _ = run_precision(cfg)  # 'auto' dtype / bf16 for this party's own device
        cid = ids[partition_id]
        strategy = components.build_strategy(cfg, components.run_context(cfg, ids, 1.0))  # no adapter scale
        if not isinstance(strategy, TrustDistill):  # a party node serves capabilities.own_models: trust_distill
            raise TypeError(f"a party node runs trust_distill, not {type(strategy).__name__}")
        with profile.phase("model"):
            model = build_party_model(cfg, model_dir, strategy.party(partition_id), cid)
        with profile.phase("data"):
            work = party_work(cfg, strategy, tokenizer)
        train = shard
        if cfg.attack.kind == "data" and cid in attackers(ids, cfg.attack.fraction, cfg.seed):
            train = corrupt_shard(shard, cfg.seed)  # simulation: this party poisons its text
        _PARTIES[key] = PartyRuntime(cid, train, shard, model, work, root, get_state(model), {})
    return _PARTIES[key]


def predict(rt: PartyRuntime, rnd: int, run: str) -> bytes:
    rt.load_(run, rnd)
    return bytes(rt.work.predictions(rt.model))


def distill(rt: PartyRuntime, rnd: int, run: str, label: bytes | None) -> dict[str, float]:
    rt.load_(run, rnd)
    losses: dict[str, float] = rt.work.train_(rt.model, rt.train, label, rnd, rt.client_id)
    rt.save(run, rnd)
    return losses


def evaluate(rt: PartyRuntime, rnd: int, run: str) -> dict[str, float]:
    rt.load_(run, rnd + 1)
    out: dict[str, float] = rt.work.evaluate(rt.model, rt.shard)
    return out

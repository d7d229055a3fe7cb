"""Reference points every user compares against: `local` (no collaboration) and `centralized`
(all data pooled in one place: the upper bound federated learning tries to reach)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.strategies.base import (
    STRATEGIES,
    Aggregate,
    Capabilities,
    Combined,
    GlobalModel,
    PeerScoring,
    StrategyBase,
)
from fedtune.strategies.fedavg import fedavg_aggregate
from fedtune.types import AdapterState, ClientUpdate, add_states


@STRATEGIES.register("local")
@dataclass(frozen=True)
class Local(StrategyBase):
    """Each client trains its own adapter on its own data; nothing is shared."""

    # each adapter stays on its client: nothing crosses the network
    capabilities = Capabilities(has_global=False, personalized=True, transmits=False)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        return {"init": global_state, "clients": {}}

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        return {cid: state["clients"].get(cid, state["init"]) for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        sent = self.configure(rnd, [u.client_id for u in updates], state)
        clients = dict(state["clients"])
        for u in updates:
            clients[u.client_id] = add_states(sent[u.client_id], u.delta)
        return Aggregate(state["init"], {**state, "clients": clients})


@STRATEGIES.register("centralized")
@dataclass(frozen=True)
class Centralized(GlobalModel):
    """One model trained on the pooled training data of all clients (no privacy; the upper bound).

    The recipe trains a single 'pooled' client for (steps x clients sampled) steps per round, so
    the compute matches a federated round; the raw data it needed is counted as uplink bytes.
    """

    # the server trains on the data it collected (counted once, as raw tokens)
    capabilities = Capabilities(pools_data=True, transmits=False, raw_data=True)

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        return fedavg_aggregate(state["global"], updates), {}, {}

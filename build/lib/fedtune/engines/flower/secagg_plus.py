"""One round under Flower's SecAgg+ (Bell et al., CCS 2020): clients quantize and mask their
(weighted) deltas and secret-share their keys; the server only recovers the weighted mean. Runs
Flower's own `SecAggPlusWorkflow` through the legacy-Strategy face it expects."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedtune.client.run import ClientJob, ClientReply
from fedtune.codecs import make_codec
from fedtune.engines.flower.wire import CountingGrid
from fedtune.secagg import SECURE_SUM
from fedtune.seeding import torch_generator
from fedtune.types import ClientFailure

RECONSTRUCTION = 0.5  # SecAgg+ needs this share of the round's clients to survive


def threshold(n: int) -> int:
    """The fewest survivors SecAgg+ reconstructs a sum from (as SecAggPlusWorkflow computes it,
    with every client a neighbour)."""
    return max(round(RECONSTRUCTION * n), 2)


@dataclass
class _Proxy:
    node_id: int


class SecAggRound:
    """Hands out this round's FitIns and keeps the unmasked aggregate (all the server learns)."""

    def __init__(self, fitins: Mapping[int, Any]):
        self.fitins = dict(fitins)
        self.results: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
        return [(_Proxy(n), ins) for n, ins in sorted(self.fitins.items())]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


def secure_round(
    grid: Any,
    context: Context,
    jobs: Sequence[ClientJob],
    node_of: Mapping[str, int],
    client_of: Mapping[int, str],
    weights: Mapping[str, float],
    timeout: float,
) -> list[ClientReply | ClientFailure]:
    """Per client a reply with metrics only (and the bytes of every protocol message it moved),
    plus one `secure-sum` reply carrying the unmasked weighted mean (identity-encoded)."""
    import torch
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    rnd = jobs[0].round
    n = len(jobs)
    least = threshold(n)
    fitins = {}
    for j in jobs:
        conf: dict[str, Any] = {"round": rnd, "participants": ",".join(j.participants), "run": j.run}
        conf.update({f"transform-{k}": v for k, v in j.transform.items()})
        # a DP noise share must give sigma * S even if only `threshold` clients survive
        conf["transform-noise_parties"] = least
        fitins[node_of[j.client_id]] = FitIns(ndarrays_to_parameters([np.frombuffer(j.payload, dtype=np.uint8)]), conf)
    adapter = SecAggRound(fitins)
    ctx = LegacyContext(context, strategy=adapter)  # type: ignore[arg-type]
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    counting = CountingGrid(grid)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every participant is a neighbour (small federations)
        reconstruction_threshold=RECONSTRUCTION,
        max_weight=max(1.0, max(weights.get(j.client_id, 1.0) for j in jobs)),
        clipping_range=8.0,  # |delta| entries beyond this are clipped by SecAgg+'s quantizer
        quantization_range=min(2**30, 2**32 // (n + 1)),  # the masked sum must not wrap mod 2^32
        timeout=timeout,
    )
    workflow(counting, ctx)  # type: ignore[arg-type]
    got = {client_of.get(proxy.node_id): res for proxy, res in adapter.results}
    out: list[ClientReply | ClientFailure] = []
    for j in jobs:
        node = node_of[j.client_id]
        res = got.get(j.client_id)
        if res is None:
            why = "secure aggregation: no reply" if adapter.results else "secure aggregation halted (too few clients)"
            out.append(ClientFailure(j.client_id, why, counting.down.get(node, 0), counting.up.get(node, 0)))
            continue
        metrics = {k: float(v) for k, v in res.metrics.items() if k not in ("secagg-keys", "num-examples")}
        num = int(res.metrics.get("num-examples", res.num_examples))
        out.append(ClientReply(j.client_id, b"", num, metrics, counting.down.get(node, 0), counting.up.get(node, 0)))
    if adapter.results:
        _, first = adapter.results[0]
        keys = json.loads(str(first.metrics["secagg-keys"]))
        arrays = parameters_to_ndarrays(first.parameters)
        mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).float() for k, a in zip(keys, arrays)}
        total_w = sum(float(r.num_examples) for _, r in adapter.results)
        payload, _ = make_codec("identity").encode(mean, None, torch_generator(0, "secure-sum"))
        out.append(ClientReply(SECURE_SUM, payload, total_w, {}, 0, 0))  # type: ignore[arg-type]
    return out

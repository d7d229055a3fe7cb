"""The records of a run (one JSON object per line of metrics.jsonl): per client and round what it
did and how its model scores, plus one summary per round (client = null)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedtune.engines.capabilities import Engine
from fedtune.evaluation.metrics import TASK_METRICS, record_fields, summarize
from fedtune.strategies.base import Capabilities
from fedtune.types import AdapterState, ClientFailure, ClientUpdate


def eval_records(
    rnd: int,
    caps: Capabilities,
    engine: Engine,
    client_ids: Sequence[str],
    global_state: AdapterState,
    personal: Mapping[str, AdapterState] | None,
    ood: bool = False,
    val: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per-client test metrics (computed where the data is, by the engine): the global model,
    the personal model (if the strategy personalizes), and test_* = the model the client ends with
    (loss, ppl and, on instruction data, accuracy, macro-F1, exact match, ROUGE-L)."""
    out: dict[str, dict[str, Any]] = {cid: {} for cid in client_ids}
    if caps.has_global or rnd == 0:
        res = engine.evaluate({cid: global_state for cid in client_ids})
        for cid, r in res.items():  # a client that is down is missing here
            out[cid].update(record_fields("global", r), test_tokens=r["tokens"])
    if personal is not None:
        res = engine.evaluate(dict(personal))
        for cid, r in res.items():
            out[cid].update(record_fields("personal", r), test_tokens=r["tokens"])
    for cid in client_ids:
        kind = "personal" if "personal_loss" in out[cid] else "global"
        out[cid].update({f"test_{k[len(kind) + 1 :]}": v for k, v in list(out[cid].items()) if k.startswith(kind)})
    if val:  # the model each client ends with, on its own validation split (for tuning)
        states = {cid: (personal or {}).get(cid, global_state) for cid in client_ids}
        for cid, r in engine.evaluate(states, split="val").items():
            out[cid].update(record_fields("val", r, sample=False))
    if ood:  # the model each client ends with, on the mixture of all clients' test data
        states = {cid: (personal or {}).get(cid, global_state) for cid in client_ids}
        for cid, r in engine.evaluate(states, split="ood").items():
            out[cid].update(record_fields("ood", r))
    return out


def client_records(
    rnd: int,
    client_ids: Sequence[str],
    sampled: Sequence[str],
    evals: Mapping[str, Mapping[str, float]],
    updates: Sequence[ClientUpdate],
    failures: Sequence[ClientFailure],
    wire: bool,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One record per client that did something this round (sampled or evaluated)."""
    by_id = {u.client_id: u for u in updates}
    fail = {f.client_id: f for f in failures}
    chosen = set(sampled)
    out = []
    for cid in client_ids:
        if cid not in chosen and not evals.get(cid):
            continue
        rec: dict[str, Any] = {"round": rnd, "client": cid, "sampled": cid in chosen, **evals.get(cid, {})}
        if cid in by_id:
            u = by_id[cid]
            rec.update(bytes_up=wire * u.bytes_up, bytes_down=wire * u.bytes_down, **u.metrics)
        if cid in fail:
            f = fail[cid]
            rec.update(failure=f.reason, bytes_down=wire * f.bytes_down, bytes_up=wire * f.bytes_up)
        rec.update((extra or {}).get(cid, {}))
        out.append(rec)
    return out


def round_summary(
    evals: Mapping[str, Mapping[str, float]], up: int, down: int, cum_before: int, failures: int
) -> dict[str, Any]:
    """Bytes (this round and cumulative), failures, mean / weighted / worst test ppl."""
    out: dict[str, Any] = {
        "bytes_up": up,
        "bytes_down": down,
        "cum_bytes": cum_before + up + down,
        "failures": failures,
    }
    done = [c for c in evals if "test_ppl" in evals[c]]
    ppl = [evals[c]["test_ppl"] for c in done]
    if ppl:
        w = [evals[c]["test_tokens"] for c in done]
        s = summarize(ppl, w)
        out.update(mean_ppl=s["mean"], weighted_mean_ppl=s["weighted_mean"], worst_ppl=s["worst"])
    val = [evals[c]["val_ppl"] for c in evals if "val_ppl" in evals[c]]
    if val:
        out["mean_val_ppl"] = sum(val) / len(val)
    ood = [evals[c]["ood_ppl"] for c in evals if "ood_ppl" in evals[c]]
    if ood:
        out["ood_mean_ppl"] = sum(ood) / len(ood)
    for prefix, name in (("test", "mean"), ("ood", "ood_mean"), ("val", "val_mean")):
        for k in TASK_METRICS:  # instruction data: mean (and worst) accuracy, F1, exact match, ROUGE-L
            vals = [evals[c][f"{prefix}_{k}"] for c in evals if f"{prefix}_{k}" in evals[c]]
            if vals:
                out[f"{name}_{k}"] = sum(vals) / len(vals)
                if prefix == "test":
                    out[f"worst_{k}"] = min(vals)
    return out

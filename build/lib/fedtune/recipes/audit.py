"""`fedtune audit RUN_DIR`: the one-run privacy audit of a finished run (Steinke, Nasr and
Jagielski 2023, arXiv:2305.08846) beside the accountant's epsilon.

The run trained with `audit.canaries` random-token blocks in `audit.clients`' training splits,
each included with probability 1/2 (RUN/audit/canaries.json, owner-readable: `data/canaries.py`).
Here every canary is scored on the run's exported model (the global adapter, or `client`'s):
score = mean next-token loss under the final model minus under the base model (the reference
removes how hard a random sequence is for the base; lower = guessed "in"), then `privacy/audit.py`
turns the correct guesses into a lower bound on epsilon. Writes RUN/audit.json.

The accountant's upper bounds it is compared with, for the canaries' unit (one block of one client):
- DP-SGD: the largest `sample_epsilon` of the canary clients (their last records), at
  `train.dp_sgd.delta`: the same neighbour relation (add / remove one example).
- DP-FedAvg: the round record's client-level `epsilon` at `dp_delta`; a canary changes part of one
  client's data: under replace-one accounting (fixed-size sampling) that is a neighbour, so eps
  holds; under add/remove-one (Poisson, q = 1) group privacy (size 2) gives 2 eps at
  (1 + e^eps) delta. The audit's attack never uses the client sample, so the amplified `epsilon`
  (not `epsilon_sample_known`) is the one to compare with.
Each comparison computes the lower bound at the upper bound's delta, so the two are comparable
(a lower bound above a valid upper bound would be a bug in the accounting or the training).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.config import load_config
from fedtune.data.canaries import SECRET, Canaries
from fedtune.errors import FedtuneError
from fedtune.files import write_atomic
from fedtune.privacy.audit import audit
from fedtune.report import io

AUDIT = "audit.json"
DEFAULT_DELTA = 1e-5  # the audit's delta when the run has no DP to compare with


@torch.no_grad()
def sequence_losses(model: Any, tokens: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean next-token cross-entropy of each row of `tokens` [m, T] -> [m] (fp32)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size].to(dev)
        logits = model(input_ids=batch).logits[:, :-1].float()  # [B, T-1, V]: position t predicts t + 1
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T-1]
        out.append(nll.mean(dim=1).cpu())
    return torch.cat(out)


def canary_scores(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Loss under the model with its adapter minus under the base model (PEFT's adapter off)."""
    final = sequence_losses(model, tokens)
    with model.disable_adapter():
        base = sequence_losses(model, tokens)
    return final - base


def accountant_bounds(cfg: Any, records: list[dict[str, Any]], clients: set[str]) -> list[dict[str, Any]]:
    """The accountant's epsilons in the records, each as an upper bound for one canary."""
    out: list[dict[str, Any]] = []
    sample = {}
    for r in records:  # the last value per canary client (epsilon only grows)
        if r.get("client") in clients and "sample_epsilon" in r:
            sample[r["client"]] = float(r["sample_epsilon"])
    if sample and cfg.train.dp_sgd is not None:
        eps = max(sample.values())
        out.append(
            {
                "mechanism": "dp_sgd",
                "recorded": "sample_epsilon (the canary clients' largest)",
                "epsilon": eps,
                "delta": cfg.train.dp_sgd.delta,
                "canary_epsilon": eps,
                "canary_delta": cfg.train.dp_sgd.delta,
                "unit": f"one training example ({cfg.train.dp_sgd.unit}) of a client: the canaries' unit",
            }
        )
    rounds = [r for r in records if r.get("client") is None and "epsilon" in r]
    if rounds:
        last = rounds[-1]
        eps, delta = float(last["epsilon"]), float(last.get("dp_delta", 0.0))
        # replace-one accounting covers a changed client directly; add/remove needs group size 2
        replace_one = "replace-one" in str(last.get("dp_accounting", ""))
        entry = {
            "mechanism": "dp_fedavg",
            "recorded": "epsilon (client level, last round)",
            "epsilon": eps,
            "delta": delta,
            "canary_epsilon": eps if replace_one else 2 * eps,
            "canary_delta": delta if replace_one else min(1.0, (1 + math.exp(min(eps, 700.0))) * delta),
            "unit": "a whole client; a canary changes part of one client's data"
            + (" (a replace-one neighbour)" if replace_one else ": group size 2 of add/remove-one"),
        }
        if "epsilon_sample_known" in last:  # seeded sampling: what holds against a party with the seed
            entry["epsilon_sample_known"] = float(last["epsilon_sample_known"])
        out.append(entry)
    return out


def audit_run(
    run_dir: Path, confidence: float = 0.95, delta: float | None = None, client: str | None = None
) -> dict[str, Any]:
    """Score the run's canaries on its final model, bound epsilon from below, write RUN/audit.json."""
    from fedtune.models.export import load_exported

    run_dir = Path(run_dir)
    if not (run_dir / io.CONFIG).exists():
        raise FedtuneError(f"{run_dir} has no {io.CONFIG}: give a run directory made by `fedtune run`")
    cfg = load_config(run_dir / io.CONFIG, [f"output_dir={run_dir}"])
    if cfg.audit is None or not (run_dir / SECRET).exists():
        raise FedtuneError(
            f"{run_dir} ran without audit canaries; run with an audit section, e.g. "
            "`--set audit.canaries=64 --set audit.clients=1`, then `fedtune audit RUN_DIR`"
        )
    if not (run_dir / io.SUMMARY).exists():
        raise FedtuneError(f"{run_dir} has not finished (no {io.SUMMARY}): the audit scores the final model")
    canaries = Canaries.from_json((run_dir / SECRET).read_text())
    model, _ = load_exported(run_dir, client)
    scores = canary_scores(model, canaries.tokens)
    records = io.read_jsonl(run_dir / io.METRICS)
    bounds = accountant_bounds(cfg, records, set(canaries.clients))
    main_delta = delta if delta is not None else (bounds[0]["delta"] if bounds else DEFAULT_DELTA)
    result = audit(scores.tolist(), canaries.included, main_delta, confidence).to_dict()
    for b in bounds:
        b["epsilon_lower"] = audit(scores.tolist(), canaries.included, b["canary_delta"], confidence).epsilon_lower
        b["lower_le_upper"] = b["epsilon_lower"] <= b["canary_epsilon"]
    inc = torch.tensor(canaries.included)
    report = {
        **result,
        "model": client or "global",
        "canary_clients": sorted(set(canaries.clients)),
        "score": "mean token loss under the final model minus under the base model (lower: guessed in)",
        "mean_score_in": float(scores[inc].mean()) if inc.any() else None,
        "mean_score_out": float(scores[~inc].mean()) if (~inc).any() else None,
        "unit": "one training block (a canary) in one client's training split",
        "method": "one-run audit, Steinke, Nasr and Jagielski 2023 (arXiv:2305.08846), Bonferroni over guess counts",
        "accountant": bounds,
    }
    import json

    write_atomic(run_dir / AUDIT, json.dumps(report, indent=2) + "\n")
    return report

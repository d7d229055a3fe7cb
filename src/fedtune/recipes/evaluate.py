"""`fedtune eval RUN_DIR --all`: every registered client scored with the model it ends with (the
loop scores `evaluation.clients`, a seeded sample, plus each round's trainers), in-process, from the
run's checkpoint and client states; a run whose parties keep their own models (trust_distill) has
each party's own model scored from the checkpoint. Writes RUN_DIR/eval/all-clients.jsonl (one record
a client)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.config import ExperimentConfig, load_config
from fedtune.engines.federation import Federation
from fedtune.engines.inprocess import inprocess_federation
from fedtune.errors import FedtuneError
from fedtune.models.load import load_tokenizer
from fedtune.recipes.decentralized import final_models
from fedtune.report import io
from fedtune.report.records import eval_records
from fedtune.strategies.base import server_strategy
from fedtune.strategies.decentralized import as_peer_strategy
from fedtune.strategies.trust_distill import TrustDistill
from fedtune.types import AdapterState


def evaluate_all(run_dir: Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / io.CHECKPOINT).exists():
        raise FedtuneError(f"{run_dir} has no {io.CHECKPOINT}: not a run directory with a finished round")
    cfg = load_config(run_dir / io.CONFIG, [f"output_dir={run_dir}"])
    if cfg.engine.name != "inprocess":
        raise FedtuneError(
            f"{run_dir} ran on {cfg.engine.name!r}: its client states live on the SuperNodes, so only they can "
            "score their clients; `fedtune eval --all` evaluates in-process runs"
        )
    fed = inprocess_federation(cfg)
    ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
    rnd, caps = int(ckpt["round"]), fed.strategy.capabilities
    if caps.own_models:  # each party's own model (of its own architecture) is in the checkpoint
        return _write(run_dir, [{"round": rnd, "client": c, **r} for c, r in _own_models(fed, cfg, ckpt).items()])
    glob: AdapterState = ckpt.get("global", {})
    personal: Mapping[str, AdapterState] | None = None
    if caps.peer_to_peer:  # each peer's model is in its own client state (the run's store)
        peer = as_peer_strategy(fed.strategy, cfg.strategy.name)
        glob, personal = ckpt["init"], final_models(cfg, peer, fed.store, fed.client_ids, ckpt["init"], rnd)
    elif caps.personalized:
        server = server_strategy(fed.strategy, cfg.strategy.name)
        personal = server.configure(rnd + 1, fed.client_ids, ckpt["strategy_state"])
    ev = cfg.evaluation
    evals = eval_records(rnd, caps, fed.engine, fed.client_ids, glob, personal, ev.ood, ev.val)
    return _write(run_dir, [{"round": rnd, "client": cid, **evals[cid]} for cid in fed.client_ids])


def _own_models(fed: Federation, cfg: ExperimentConfig, ckpt: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Every party's own model, restored from the checkpoint, on its own splits (and the pooled
    mixture under evaluation.ood): the records the distillation loop writes for its last round."""
    if not isinstance(fed.strategy, TrustDistill):  # the one strategy of capabilities.own_models
        raise TypeError(f"own models are trust_distill's, not {type(fed.strategy).__name__}'s")
    parties = fed.engine.parties(cfg, fed.strategy, fed.model_dir, load_tokenizer(fed.model_dir))
    parties.restore_(ckpt["parties"])
    return parties.evaluate(int(ckpt["round"]))


def _write(run_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (run_dir / "eval").mkdir(exist_ok=True)
    io.write_jsonl(run_dir / "eval" / "all-clients.jsonl", records)
    return records

"""The client plan, built once from the config and the strategy, identically on every engine
(the server, a Flower SuperNode, a peer): training step, penalty, update transforms, codecs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedtune import components
from fedtune.adapters import build_adapter
from fedtune.client.run import ClientJob, ClientPlan, UpdateTransform
from fedtune.config import ExperimentConfig
from fedtune.data.blocks import Shard
from fedtune.engines.faults import AttackTransform, attackers
from fedtune.sampling import SAMPLING_NOTES
from fedtune.secagg import MaskTransform
from fedtune.strategies.base import ClientTransformStrategy, StrategyCore, client_step_of, client_transform_of
from fedtune.types import AdapterState


@dataclass(frozen=True)
class StrategyTransform:
    """A strategy's client-side step before masking (DP-FedAvg: clip + noise share)."""

    strategy: ClientTransformStrategy

    def __call__(self, delta: AdapterState, job: ClientJob, shard: Shard, state: Any) -> AdapterState:
        # noise shares are sized for the fewest clients whose sum can come out: all participants
        # in-process (known before masking), SecAgg+'s reconstruction threshold on Flower
        n = int(job.transform.get("noise_parties", max(1, len(job.participants))))
        return self.strategy.client_transform(delta, job.transform, job.round, job.client_id, n)


SECAGG_NOTES = {
    "seeded": "seeded: mask keys derived from the seed (simulation only: anyone holding the config can unmask)",
    "secure": "secure: mask keys from the OS CSPRNG, in memory for their round only, never written",
}
WITHHELD = "withheld: clients send no training loss under DP or secure aggregation (privacy.release_client_metrics)"


def releases_client_metrics(cfg: ExperimentConfig, caps: Any) -> bool:
    """Whether clients send their training metrics: as configured, else not under DP (a strategy
    that accounts privacy, or DP-SGD) or secure aggregation, whose guarantees do not cover them."""
    if cfg.privacy.release_client_metrics is not None:
        return cfg.privacy.release_client_metrics
    return not (caps.accounts_sampling or cfg.train.dp_sgd is not None or cfg.secure_aggregation)


def privacy_facts(cfg: ExperimentConfig, caps: Any) -> dict[str, str]:
    """The round-0 record of where the client sample comes from and whether clients send metrics."""
    metrics = "released" if releases_client_metrics(cfg, caps) else WITHHELD
    facts = {"sampling_randomness": SAMPLING_NOTES[cfg.randomness()], "client_metrics": metrics}
    if cfg.secure_aggregation:
        facts["secagg_randomness"] = SECAGG_NOTES[cfg.randomness()]
    return facts


def build_plan(
    cfg: ExperimentConfig, strategy: StrategyCore, init_state: AdapterState, client_ids: Sequence[str]
) -> ClientPlan:
    """Transforms run in this order: attack injection (simulation), the strategy's client step
    under secure aggregation (DP clip and noise share), secure-aggregation masking."""
    caps = strategy.capabilities
    transforms: list[UpdateTransform] = []
    if cfg.attack.kind not in ("none", "data"):
        bad = attackers(list(client_ids), cfg.attack.fraction, cfg.seed)
        transforms.append(AttackTransform(cfg.attack.kind, cfg.attack.scale, bad, cfg.seed))
    client_transform = client_transform_of(strategy)
    if cfg.secure_aggregation and client_transform is not None:
        transforms.append(StrategyTransform(client_transform))
    masks = cfg.secure_aggregation and cfg.engine.name == "inprocess"  # on Flower, SecAgg+ masks
    if masks:
        transforms.append(MaskTransform(caps.sum_weight))
    keep = strategy.private_keys(init_state) if caps.client_private else set()
    adapter = build_adapter(cfg.adapter)
    # a peer's step gets its own model and returns its delta inside the peer: `codec` is for its messages
    local = caps.peer_to_peer
    step = client_step_of(strategy)
    return ClientPlan(
        spec=components.build_train_spec(cfg),
        seed=cfg.seed,
        up_codec=components.local_codec() if local else components.build_codec(cfg),
        client_up_codecs={} if local else {c: components.build_codec(cfg, client=c) for c in sorted(cfg.client_codecs)},
        down_codec=components.local_codec() if local else components.build_codec(cfg, downlink=True),
        step=step.client_train if step is not None else None,
        penalty=strategy.client_penalty if caps.client_penalty else None,
        transforms=tuple(transforms),
        variants=adapter.client_variants(list(client_ids)),
        adapter=adapter,
        client_lr=dict(cfg.train.client_lr or {}),
        private_init={k: init_state[k] for k in sorted(keep)},
        secure_aggregation=masks,
        randomness=cfg.randomness(),
        release_metrics=releases_client_metrics(cfg, caps),
    )

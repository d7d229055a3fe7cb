"""The ClientApp: every SuperNode runs `run_client` on its own data, with its client state on its
own disk (a `ClientStateStore`: `state-dir` in the node config, else under fedtune's cache; in
simulation the run directory's `clients/`), never on the server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client.run import ClientJob, ClientPlan, run_client
from fedtune.client.store import ClientStateStore
from fedtune.codecs import make_codec
from fedtune.data.blocks import Shard
from fedtune.engines.flower import profile
from fedtune.engines.flower.wire import CONFIG_KEY, config_from_yaml, from_record, to_record
from fedtune.errors import FedtuneError


@dataclass
class ClientRuntime:
    """Everything a SuperNode keeps between messages (the base model is loaded once per process)."""

    cfg: Any
    client_id: str
    shard: Shard
    model: Any
    plan: ClientPlan
    state_root: Path
    weight: float  # this client's weight in a SecAgg+ sum (the strategy's sum weight)
    stores: dict[str, ClientStateStore]
    tokenizer: Any = None  # decodes generations (instruction data)

    def store(self, run: str) -> ClientStateStore:
        """This node's client-state store for one run (by the run's token)."""
        if run not in self.stores:
            self.stores[run] = ClientStateStore(self.state_root / (run or "default"), self.plan.initial_state())
        return self.stores[run]


_RUNTIMES: dict[tuple[str, int, str], ClientRuntime] = {}
# per config, what every client in this process shares: (cfg, model dir, tokenizer); every
# client's shards (built only when a node's shard is not cached); (model, strategy, plan)
_BASES: dict[str, tuple[Any, str, Any]] = {}
_SHARDS: dict[str, Any] = {}
_PROCESS: dict[str, tuple[Any, ...]] = {}


def node_base(cfg_yaml: str) -> tuple[Any, str, Any]:
    """(cfg, model dir, tokenizer), once per process and config (parties too: `party_node.py`)."""
    if cfg_yaml not in _BASES:
        with profile.phase("imports"):
            from fedtune.models.load import load_tokenizer, resolve_model_dir
        cfg = config_from_yaml(cfg_yaml)
        with profile.phase("tokenizer"):
            model_dir = resolve_model_dir(cfg.model, cfg.seed)
            _BASES[cfg_yaml] = (cfg, model_dir, load_tokenizer(model_dir))
    return _BASES[cfg_yaml]


def node_shard(cfg_yaml: str, partition_id: int, root: Path) -> tuple[list[str], Shard]:
    """(the run's client ids in partition order, partition `partition_id`'s shard): read from the
    node's shard cache under `root/shards` (`data.shard_cache`), else built from the corpus (read,
    partitioned and tokenized once per process) and written there for the node's next message."""
    cfg, _, tokenizer = node_base(cfg_yaml)

    def build() -> tuple[list[str], Shard]:
        if cfg_yaml not in _SHARDS:
            from fedtune.engines.federation import load_shards

            _SHARDS[cfg_yaml], _ = load_shards(cfg, tokenizer)
        ids = list(_SHARDS[cfg_yaml])
        return ids, _SHARDS[cfg_yaml][ids[partition_id]]

    with profile.phase("data"):
        if cfg.audit is not None:  # audit canaries are drawn per run: such shards are never cached
            return build()
        from fedtune.data.shard_cache import cached_shard, shard_key

        return cached_shard(root / "shards", shard_key(cfg, tokenizer, partition_id), build)


def _shared(cfg_yaml: str, ids: list[str]) -> tuple[Any, ...]:
    """(cfg, tokenizer, model, strategy, plan): loaded once per process and config, however many
    virtual SuperNodes it serves (one base model)."""
    if cfg_yaml not in _PROCESS:
        with profile.phase("imports"):
            from fedtune import components
            from fedtune.engines.federation import build_adapted_model, rank_per_client, resolve_auto, run_precision
            from fedtune.engines.plan import build_plan
            from fedtune.models.adapters import get_state, lora_scale

        cfg, model_dir, tokenizer = node_base(cfg_yaml)
        cfg, _ = resolve_auto(cfg, ids, model_dir)  # the same picks as the server's
        ranks = rank_per_client(cfg, ids)
        with profile.phase("model"):
            cfg, _, _ = run_precision(cfg)  # 'auto' dtype / bf16 for this SuperNode's device
            model, _ = build_adapted_model(cfg, model_dir, ranks, tokenizer)
        with profile.phase("plan"):
            strategy = components.build_strategy(cfg, components.run_context(cfg, ids, lora_scale(model)))
            plan = build_plan(cfg, strategy, get_state(model), ids)
        _PROCESS[cfg_yaml] = (cfg, tokenizer, model, strategy, plan)
    return _PROCESS[cfg_yaml]


def client_runtime(cfg_yaml: str, partition_id: int, state_root: str) -> ClientRuntime:
    key = (cfg_yaml, partition_id, state_root)
    if key not in _RUNTIMES:
        from fedtune.engines.faults import attackers, corrupt_shard

        root = Path(state_root).expanduser()
        ids, shard = node_shard(cfg_yaml, partition_id, root)
        cfg, tokenizer, model, strategy, plan = _shared(cfg_yaml, ids)
        cid = ids[partition_id]
        if cfg.attack.kind == "data" and cid in attackers(ids, cfg.attack.fraction, cfg.seed):
            shard = corrupt_shard(shard, cfg.seed)  # simulation: this client poisons its text
        weight = strategy.capabilities.weight(shard.num_examples)
        _RUNTIMES[key] = ClientRuntime(cfg, cid, shard, model, plan, root, weight, {}, tokenizer)
    return _RUNTIMES[key]


def node_key(cfg_yaml: str, node_config: Mapping[str, Any], state_root: str | None) -> tuple[str, int, str]:
    """(the run's config YAML, this node's partition, its state root): what a node's runtime is
    cached under."""
    from fedtune.cache import cache_dir

    root = str(node_config.get("state-dir", "")) or state_root or str(cache_dir() / "node-state")
    # one folder per client under the root (several SuperNodes may share a machine)
    return cfg_yaml, int(node_config.get("partition-id", 0)), root


def node_of(context: Context, cfg_yaml: str | None, state_root: str | None) -> tuple[str, int, str]:
    """`node_key` from Flower's context."""
    text = cfg_yaml or str(context.run_config.get(CONFIG_KEY, ""))
    if not text:
        raise FedtuneError(f"run config has no {CONFIG_KEY!r}; start the run with fedtune")
    return node_key(text, context.node_config, state_root)


def preload_node(app_dir: Path, node_config: Mapping[str, Any]) -> str:
    """Set this node up, ahead of its first message, for the fedtune app in `app_dir` (what a warm
    zygote does before it forks ClientApps: `engines.flower.warm`): the tokenizer, the shard, the
    base model with its adapter, the strategy and plan (a party's own model for `own_models`
    strategies), cached under the key the ClientApp computes from the run config Flower builds
    from the same app. A run submitted with other values (`flwr run --run-config`) has another
    key and sets itself up as before. On a CUDA device only the tokenizer and the shard: CUDA
    initialised in a process does not survive its fork, so each message's process loads the
    model there. Returns what was set up, for the node's log."""
    from flwr.common.config import get_fused_config_from_dir

    from fedtune.components import strategy_capabilities

    text = str(get_fused_config_from_dir(Path(app_dir), {}).get(CONFIG_KEY, ""))
    if not text:
        raise FedtuneError(
            f"{app_dir}/pyproject.toml has no {CONFIG_KEY!r} in [tool.flwr.app.config]: not a fedtune app"
        )
    key = node_key(text, node_config, None)
    cfg = node_base(text)[0]
    if _uses_cuda(cfg.model.device):
        ids, _ = node_shard(text, key[1], Path(key[2]).expanduser())
        return f"{ids[key[1]]}: tokenizer and shard (the model loads per message on CUDA)"
    caps = strategy_capabilities(cfg)
    if caps is not None and caps.own_models:
        from fedtune.engines.flower import party_node

        return f"{party_node.party_runtime(*key).client_id}: tokenizer, shard and the party's model"
    return f"{client_runtime(*key).client_id}: tokenizer, shard, model, strategy and plan"


def _uses_cuda(device: str) -> bool:
    """Whether `model.device` puts the model on a CUDA GPU here, asked without initialising CUDA
    in this process (NVML's device count, as torch offers for processes that fork)."""
    import torch

    if device.startswith("cuda"):
        return True
    if device != "auto" or not torch.backends.cuda.is_built():
        return False
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return bool(torch.cuda.is_available())


def _runtime(context: Context, cfg_yaml: str | None, state_root: str | None) -> ClientRuntime:
    return client_runtime(*node_of(context, cfg_yaml, state_root))


def job_of(rt: ClientRuntime, config: Any, payload: bytes) -> ClientJob:
    participants = tuple(p for p in str(config.get("participants", "")).split(",") if p)
    transform = {k[len("transform-") :]: v for k, v in config.items() if k.startswith("transform-")}
    return ClientJob(int(config["round"]), rt.client_id, payload, participants, transform, str(config.get("run", "")))


def train_step(rt: ClientRuntime, job: ClientJob) -> Any:
    """run_client with this node's stored state; the new state is stored before replying."""
    store = rt.store(job.run)
    state = store.get(rt.client_id, before=job.round)
    reply, state = run_client(job, rt.model, rt.shard, rt.plan, state)
    store.put(rt.client_id, state, job.round)
    return reply


def secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client mod for the train messages of a secure-aggregation round (they
    carry SecAgg+ configs); plain train messages go straight to the handler."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        out: Message = secaggplus_mod(msg, context, call_next)
        return out
    return call_next(msg, context)  # type: ignore[no-any-return]


def secure_train(rt: ClientRuntime, msg: Message) -> Message:
    """A client's part of a SecAgg+ round: run_client (its plan has the strategy's client step,
    e.g. DP clip + noise share, and no fedtune mask), then reply with the weighted delta as float
    arrays in the legacy FitRes format; Flower's SecAgg+ mod quantizes and masks them."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

    from fedtune.seeding import derive_seed

    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    job = job_of(rt, fitins.config, parameters_to_ndarrays(fitins.parameters)[0].tobytes())
    reply = train_step(rt, job)
    delta, _ = rt.plan.up_codec.decode(reply.payload, None)  # identity (enforced with SecAgg+)
    keys = sorted(delta)
    if rt.cfg.randomness() == "seeded":  # reproducible SecAgg+ stochastic rounding in simulation only
        np.random.seed(derive_seed(rt.cfg.seed, "secaggplus", job.round, rt.client_id) % 2**32)
    res = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([delta[k].detach().double().numpy() for k in keys]),
        int(round(rt.weight)),
        {**reply.metrics, "secagg-keys": json.dumps(keys), "num-examples": rt.shard.num_examples},
    )
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def make_client_app(cfg_yaml: str | None = None, state_root: str | None = None) -> ClientApp:
    """A ClientApp; in deployment the config comes from the run config, in simulation from here."""
    app = ClientApp(mods=[secagg_when_asked])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        started = time.time()
        rt = _runtime(context, cfg_yaml, state_root)
        stats = {f"stat-{k}": float(v) for k, v in rt.shard.stats.items()}  # counts only, never content
        order = int(context.node_config.get("partition-id", 0))  # the server lists clients in this order
        info = ConfigRecord({"client": rt.client_id, "order": order, "examples": int(rt.shard.num_examples), **stats})
        profile.client_message("query", rt.client_id, started)
        return Message(RecordDict({"info": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.time()
        rt = _runtime(context, cfg_yaml, state_root)
        if "fitins.parameters" in msg.content.array_records:  # a SecAgg+ round
            return secure_train(rt, msg)
        reply = train_step(rt, job_of(rt, msg.content["config"], from_record(msg.content.array_records["payload"])))
        metrics = MetricRecord({**reply.metrics, "num-examples": reply.num_examples})
        profile.client_message("train", rt.client_id, started)
        return Message(RecordDict({"payload": to_record(reply.payload), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedtune.adapters import adapter_of
        from fedtune.evaluation.metrics import evaluate_split
        from fedtune.models.adapters import set_state_

        started = time.time()
        rt = _runtime(context, cfg_yaml, state_root)
        state, _ = make_codec("identity").decode(from_record(msg.content.array_records["payload"]), None)
        adapter_of(rt.model).use_client_(rt.model, rt.plan.variants.get(rt.client_id))
        config = msg.content.config_records["config"]
        rnd = int(str(config["round"]))
        private = rt.store(str(config.get("run", ""))).get(rt.client_id, before=rnd + 1).private
        set_state_(rt.model, {**private, **state})
        split = "val" if str(config.get("split", "test")) == "val" else "test"
        blocks = rt.shard.val if split == "val" else rt.shard.test
        if blocks.shape[0] == 0:  # nothing to score (no validation blocks): say nothing
            return Message(RecordDict({"metrics": MetricRecord({})}), reply_to=msg)
        res = evaluate_split(
            rt.model,
            blocks,
            rt.shard.mask(split),
            rt.shard.prompts.get(split),
            rt.tokenizer,
            rt.cfg.evaluation,
            rt.plan.spec.bf16,
        )
        numbers = {k: float(v) for k, v in res.items() if not isinstance(v, str)}
        texts = ConfigRecord({k: v for k, v in res.items() if isinstance(v, str)})  # generation samples
        out = RecordDict({"metrics": MetricRecord(numbers), "texts": texts})  # type: ignore[arg-type]
        profile.client_message("evaluate", rt.client_id, started)
        return Message(out, reply_to=msg)

    _party_handlers(app, cfg_yaml, state_root)
    return app


def _party_handlers(app: ClientApp, cfg_yaml: str | None, state_root: str | None) -> None:
    """trust_distill's messages (`engines/flower/parties.py`): a party's own model on this node."""

    def party(msg: Message, context: Context) -> tuple[Any, Any, int, str]:
        from fedtune.engines.flower import party_node

        config = msg.content.config_records["config"]
        rt = party_node.party_runtime(*node_of(context, cfg_yaml, state_root))
        return party_node, rt, int(str(config["round"])), str(config.get("run", ""))

    @app.query("predict")
    def predict(msg: Message, context: Context) -> Message:
        started = time.time()
        node, rt, rnd, run = party(msg, context)
        out = RecordDict({"payload": to_record(node.predict(rt, rnd, run))})
        profile.client_message("query.predict", rt.client_id, started)
        return Message(out, reply_to=msg)

    @app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        started = time.time()
        node, rt, rnd, run = party(msg, context)
        got = msg.content.array_records.get("payload")
        losses = node.distill(rt, rnd, run, None if got is None else from_record(got))
        profile.client_message("train.distill", rt.client_id, started)
        return Message(RecordDict({"metrics": MetricRecord(losses)}), reply_to=msg)

    @app.evaluate("party")
    def evaluate(msg: Message, context: Context) -> Message:
        started = time.time()
        node, rt, rnd, run = party(msg, context)
        metrics = MetricRecord(node.evaluate(rt, rnd, run))
        profile.client_message("evaluate.party", rt.client_id, started)
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)


client_app = make_client_app()  # for `flwr run` (deployment): config from the run config

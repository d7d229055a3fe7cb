"""The Flower engine: the same client update, codec and Strategy inside a Flower ServerApp and
ClientApp (Message API, flwr==1.41.0). The only module that imports `flwr`.

Payloads are the codec's bytes carried as one uint8 Flower array, so bytes are counted exactly as
in-process. The experiment config travels as YAML in the run config (key `fedtune-config`); each
SuperNode finds its client from `partition-id` in its node config (client ids in sorted order).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")  # never a CUDA torch
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedtune.client.round import client_round  # noqa: E402
from fedtune.codecs import make_codec  # noqa: E402
from fedtune.config import ExperimentConfig, config_from_dict, config_to_yaml  # noqa: E402
from fedtune.errors import ConfigError, FedtuneError, Problem  # noqa: E402
from fedtune.seeding import torch_generator  # noqa: E402
from fedtune.types import AdapterState, ClientFailure, ClientUpdate  # noqa: E402

FLWR_VERSION = "1.41.0"
CONFIG_KEY = "fedtune-config"


# -- wire format ---------------------------------------------------------------------------------


def to_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord(array_dict={"payload": Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def from_record(record: ArrayRecord) -> bytes:
    return record["payload"].numpy().tobytes()


def config_from_yaml(text: str) -> ExperimentConfig:
    import yaml

    return config_from_dict(yaml.safe_load(text))


# -- client side ---------------------------------------------------------------------------------


@dataclass
class ClientRuntime:
    """Everything a SuperNode keeps between messages (the base model is loaded once per process)."""

    cfg: ExperimentConfig
    client_id: str
    shard: Any
    model: Any
    codec: Any
    down_codec: Any
    spec: Any
    penalty: Any
    strategy: Any


_RUNTIMES: dict[tuple[str, int], ClientRuntime] = {}


def client_runtime(cfg_yaml: str, partition_id: int) -> ClientRuntime:
    key = (cfg_yaml, partition_id)
    if key not in _RUNTIMES:
        from fedtune import components
        from fedtune.models.load import load_tokenizer, resolve_model_dir
        from fedtune.recipes.federated import build_adapted_model, load_shards, rank_per_client, sb_public_blocks

        cfg = config_from_yaml(cfg_yaml)
        model_dir = resolve_model_dir(cfg.model, cfg.seed)
        tokenizer = load_tokenizer(model_dir)
        shards = load_shards(cfg, tokenizer)
        ids = list(shards)
        cid = ids[partition_id]
        ranks = rank_per_client(cfg, ids)
        model, _ = build_adapted_model(cfg, model_dir, ranks, lambda: sb_public_blocks(cfg, tokenizer))
        from fedtune.models.adapters import lora_scale

        strategy = components.build_strategy(cfg, lora_scale=lora_scale(model), seed=cfg.seed, client_ranks=ranks)
        _RUNTIMES[key] = ClientRuntime(
            cfg,
            cid,
            shards[cid],
            model,
            components.build_codec(cfg),
            components.build_codec(cfg, downlink=True),
            components.build_train_spec(cfg),
            getattr(strategy, "client_penalty", None),
            strategy,
        )
    return _RUNTIMES[key]


def _runtime(context: Context, cfg_yaml: str | None) -> ClientRuntime:
    text = cfg_yaml or str(context.run_config.get(CONFIG_KEY, ""))
    if not text:
        raise FedtuneError(f"run config has no {CONFIG_KEY!r}; start the run with fedtune")
    return client_runtime(text, int(context.node_config.get("partition-id", 0)))


def secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client mod for the train messages of a secure-aggregation round (they
    carry SecAgg+ configs); plain train messages go straight to the handler."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_train(rt: ClientRuntime, msg: Message) -> Message:
    """A client's part of a SecAgg+ round: train, apply the strategy's client-side step (DP-FedAvg:
    clip + noise share), and reply with the delta as float arrays in the legacy FitRes format;
    Flower's SecAgg+ mod quantizes and masks them (stochastic rounding seeded per round/client)."""
    import json

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

    from fedtune.seeding import derive_seed

    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    rnd = int(fitins.config["round"])
    payload = parameters_to_ndarrays(fitins.parameters)[0].tobytes()
    t0 = time.perf_counter()
    received, _ = rt.down_codec.decode(payload, None)
    delta, metrics, _ = client_round(rt.model, received, rt.shard, rt.spec, rt.cfg.seed, rnd, None, rt.penalty)
    if hasattr(rt.strategy, "client_transform"):
        conf = {k[len("transform-") :]: v for k, v in fitins.config.items() if k.startswith("transform-")}
        delta = rt.strategy.client_transform(delta, conf, rnd, rt.client_id, int(fitins.config["participants"]))
    keys = sorted(delta)
    weight = getattr(rt.strategy, "secure_weight", float)(rt.shard.num_examples)
    metrics["client_seconds"] = time.perf_counter() - t0
    np.random.seed(derive_seed(rt.cfg.seed, "secaggplus", rnd, rt.client_id) % 2**32)  # SecAgg+ rounding
    res = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([delta[k].detach().double().numpy() for k in keys]),
        int(round(weight)),
        {**metrics, "secagg-keys": json.dumps(keys), "num-examples": rt.shard.num_examples},
    )
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def make_client_app(cfg_yaml: str | None = None) -> ClientApp:
    """A ClientApp; in deployment the config comes from the run config, in simulation from here."""
    app = ClientApp(mods=[secagg_when_asked])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        rt = _runtime(context, cfg_yaml)
        info = ConfigRecord({"client": rt.client_id, "examples": int(rt.shard.num_examples)})
        return Message(RecordDict({"info": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = _runtime(context, cfg_yaml)
        if "fitins.parameters" in msg.content.array_records:  # a SecAgg+ round
            return secure_train(rt, msg)
        rnd = int(msg.content["config"]["round"])
        t0 = time.perf_counter()
        received, _ = rt.down_codec.decode(from_record(msg.content["payload"]), None)
        delta, metrics, _ = client_round(rt.model, received, rt.shard, rt.spec, rt.cfg.seed, rnd, None, rt.penalty)
        up, _ = rt.codec.encode(delta, None, torch_generator(rt.cfg.seed, "codec-up", rnd, rt.client_id))
        metrics["client_seconds"] = time.perf_counter() - t0
        content = RecordDict(
            {"payload": to_record(up), "metrics": MetricRecord({**metrics, "num-examples": rt.shard.num_examples})}
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedtune.evaluation.metrics import evaluate_blocks
        from fedtune.models.adapters import set_state_

        rt = _runtime(context, cfg_yaml)
        state, _ = make_codec("identity").decode(from_record(msg.content["payload"]), None)
        set_state_(rt.model, state)
        res = evaluate_blocks(rt.model, rt.shard.test, rt.cfg.evaluation.batch_size, rt.spec.bf16)
        return Message(RecordDict({"metrics": MetricRecord(res)}), reply_to=msg)

    return app


client_app = make_client_app()  # for `flwr run` (deployment): config from the run config


# -- server side ---------------------------------------------------------------------------------


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: array data, bytes and strings at their length, numbers 8."""

    def size(v: Any) -> int:
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8

    total = 0
    for rec in content.array_records.values():
        total += sum(len(a.data) for a in rec.values())
    for crec in content.config_records.values():
        total += sum(size(v) for v in crec.values())
    for mrec in content.metric_records.values():
        total += sum(size(v) for v in mrec.values())
    return total


class CountingGrid:
    """A Grid that counts the bytes of every message to, and reply from, each node."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        msgs = list(messages)
        for m in msgs:
            self.down[m.metadata.dst_node_id] = self.down.get(m.metadata.dst_node_id, 0) + content_bytes(m.content)
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        for r in replies:
            if not r.has_error():
                src = r.metadata.src_node_id
                self.up[src] = self.up.get(src, 0) + content_bytes(r.content)
        return replies


@dataclass
class _Proxy:
    node_id: int


class SecAggRound:
    """The legacy-Strategy face SecAgg+'s workflow expects: hands out this round's FitIns and
    keeps the unmasked aggregate (the only thing the server learns)."""

    def __init__(self, fitins: Mapping[int, Any]):
        self.fitins = dict(fitins)
        self.results: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
        return [(_Proxy(n), ins) for n, ins in sorted(self.fitins.items())]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


class FlowerEngine:
    """Runs client rounds by sending Flower messages; expected failures become ClientFailure.
    With secure aggregation a round runs Flower's SecAgg+ protocol (module `secure_round`)."""

    def __init__(
        self,
        grid: Grid,
        node_of: Mapping[str, int],
        codec: Any,
        timeout: float,
        *,
        context: Context | None = None,
        examples: Mapping[str, int] | None = None,
        secure: bool = False,
    ):
        self.grid = grid
        self.node_of = dict(node_of)
        self.client_of = {n: c for c, n in node_of.items()}
        self.codec = codec
        self.timeout = timeout
        self.collected_bytes = 0
        self.context = context
        self.examples = dict(examples or {})
        self.secure = secure
        self.secure_result: ClientUpdate | None = None  # the unmasked aggregate of a SecAgg+ round
        self.secure_weight: Callable[[int], float] = float  # set by the recipe from the strategy
        self.transform_config: dict[str, Any] = {}  # sent to clients for their client-side step (DP clip)

    def refresh(self) -> None:
        """A SuperNode that restarted comes back with a new node id: ask new nodes who they are."""
        nodes = set(self.grid.get_node_ids())
        new = sorted(nodes - set(self.client_of))
        if not new:
            return
        msgs = [
            self.grid.create_message(RecordDict({"q": ConfigRecord({"what": "client"})}), "query", n, group_id="query")
            for n in new
        ]
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                continue
            cid = str(reply.content["info"]["client"])
            if cid in self.node_of:
                self.client_of.pop(self.node_of[cid], None)
            self.node_of[cid] = reply.metadata.src_node_id
            self.client_of[reply.metadata.src_node_id] = cid

    def _send(self, kind: str, payloads: Mapping[str, bytes], rnd: int) -> dict[str, Message | str]:
        self.refresh()
        msgs = []
        for cid, payload in payloads.items():
            content = RecordDict({"payload": to_record(payload), "config": ConfigRecord({"round": rnd})})
            msgs.append(self.grid.create_message(content, kind, self.node_of[cid], group_id=f"{kind}-{rnd}"))
        out: dict[str, Message | str] = {cid: "timeout: no reply" for cid in payloads}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            cid = self.client_of.get(reply.metadata.src_node_id)
            if cid is not None:
                out[cid] = f"error: {reply.error.reason}" if reply.has_error() else reply
        return out

    def run_clients(
        self, rnd: int, payloads: Mapping[str, bytes], codec_states: dict[str, Any], on_step: Any = None
    ) -> tuple[list[ClientUpdate | ClientFailure], dict[str, Any]]:
        if self.secure:
            return self.secure_round(rnd, payloads), codec_states
        replies: list[ClientUpdate | ClientFailure] = []
        for cid, reply in self._send("train", payloads, rnd).items():
            if isinstance(reply, str):
                replies.append(ClientFailure(cid, reply, len(payloads[cid])))
                continue
            up = from_record(reply.content["payload"])
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
            n = int(metrics.pop("num-examples"))
            delta, _ = self.codec.decode(up, None)
            replies.append(ClientUpdate(cid, delta, n, metrics, len(up), len(payloads[cid])))
        return replies, codec_states

    def secure_round(self, rnd: int, payloads: Mapping[str, bytes]) -> list[ClientUpdate | ClientFailure]:
        """One round under Flower's SecAgg+ (Bell et al., CCS 2020): clients quantize and mask
        their (weighted) deltas, secret-share their keys, and the server only recovers the
        weighted mean, which becomes `secure_result`; each client's reply carries metrics only.
        Bytes are those of every protocol message (4 stages), counted per node."""
        import json

        import torch
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        if self.context is None:
            raise FedtuneError("secure aggregation on Flower needs the ServerApp's context")
        self.refresh()
        self.secure_result = None
        n = len(payloads)
        conf = {"round": rnd, "participants": n, **{f"transform-{k}": v for k, v in self.transform_config.items()}}
        fitins = {
            self.node_of[c]: FitIns(ndarrays_to_parameters([np.frombuffer(p, dtype=np.uint8)]), dict(conf))
            for c, p in payloads.items()
        }
        adapter = SecAggRound(fitins)
        ctx = LegacyContext(self.context, strategy=adapter)  # type: ignore[arg-type]
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        weights = [self.secure_weight(self.examples.get(c, 1)) for c in payloads]
        grid = CountingGrid(self.grid)
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,  # every participant is a neighbour (small federations)
            reconstruction_threshold=0.5,
            max_weight=max(1.0, max(weights)),
            clipping_range=8.0,  # |delta| entries beyond this are clipped by SecAgg+'s quantizer
            quantization_range=min(2**30, 2**32 // (n + 1)),  # the masked sum must not wrap mod 2^32
            timeout=self.timeout,
        )
        workflow(grid, ctx)  # type: ignore[arg-type]
        got = {self.client_of.get(proxy.node_id): res for proxy, res in adapter.results}
        out: list[ClientUpdate | ClientFailure] = []
        for cid in payloads:
            node = self.node_of[cid]
            res = got.get(cid)
            if res is None:
                why = (
                    "secure aggregation: no reply" if adapter.results else "secure aggregation halted (too few clients)"
                )
                out.append(ClientFailure(cid, why, grid.down.get(node, 0), grid.up.get(node, 0)))
                continue
            metrics = {k: float(v) for k, v in res.metrics.items() if k not in ("secagg-keys", "num-examples")}
            num = int(res.metrics.get("num-examples", res.num_examples))
            out.append(ClientUpdate(cid, {}, num, metrics, grid.up.get(node, 0), grid.down.get(node, 0)))
        if adapter.results:
            _, first = adapter.results[0]
            keys = json.loads(str(first.metrics["secagg-keys"]))
            arrays = parameters_to_ndarrays(first.parameters)
            mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).float() for k, a in zip(keys, arrays)}
            total_w = sum(float(r.num_examples) for _, r in adapter.results)
            self.secure_result = ClientUpdate("secure-sum", mean, total_w, {"train_loss": 0.0}, 0, 0)  # type: ignore[arg-type]
        return out

    def evaluate(self, states: Mapping[str, AdapterState]) -> dict[str, dict[str, float]]:
        ident = make_codec("identity")
        encoded: dict[int, bytes] = {}
        payloads = {}
        for cid, st in states.items():
            if id(st) not in encoded:
                encoded[id(st)], _ = ident.encode(st, None, torch_generator(0, "eval"))
            payloads[cid] = encoded[id(st)]
        out = {}
        for cid, reply in self._send("evaluate", payloads, 0).items():
            if not isinstance(reply, str):  # a client that is down is simply not evaluated this round
                out[cid] = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
        return out


def discover_clients(
    grid: Grid, expected: int, timeout: float, examples: dict[str, int] | None = None
) -> dict[str, int]:
    """Wait for `expected` SuperNodes, then ask each which client it is (and, into `examples`,
    how many training examples it has: SecAgg+ needs the largest weight in advance)."""
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            break
        time.sleep(1.0)
    if len(nodes) < expected:
        raise FedtuneError(f"only {len(nodes)} of {expected} SuperNodes connected within {timeout:.0f} s")
    msgs = [
        grid.create_message(RecordDict({"q": ConfigRecord({"what": "client"})}), "query", n, group_id="query")
        for n in nodes
    ]
    node_of: dict[str, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise FedtuneError(f"SuperNode {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        info = reply.content["info"]
        node_of[str(info["client"])] = reply.metadata.src_node_id
        if examples is not None and "examples" in info:
            examples[str(info["client"])] = int(info["examples"])  # type: ignore[arg-type]
    return dict(sorted(node_of.items()))


def flower_federation(
    grid: Grid, expected: int, timeout: float, context: Context | None = None
) -> Callable[[ExperimentConfig], Any]:
    from fedtune.models.load import load_tokenizer, resolve_model_dir
    from fedtune.recipes.federated import Federation, build_adapted_model, rank_per_client, sb_public_blocks

    def build(cfg: ExperimentConfig) -> Federation:
        examples: dict[str, int] = {}
        node_of = discover_clients(grid, expected, timeout, examples)
        ids = list(node_of)
        ranks = rank_per_client(cfg, ids)
        model_dir = resolve_model_dir(cfg.model, cfg.seed)
        tokenizer = load_tokenizer(model_dir)
        model, adapter_cfg = build_adapted_model(cfg, model_dir, ranks, lambda: sb_public_blocks(cfg, tokenizer))

        def make_engine(strategy: Any, codec: Any, spec: Any) -> FlowerEngine:
            return FlowerEngine(
                grid, node_of, codec, timeout, context=context, examples=examples, secure=cfg.secure_aggregation
            )

        return Federation(ids, model, model_dir, adapter_cfg, ranks, make_engine)

    return build


def check_flower(cfg: ExperimentConfig) -> None:
    """What the Flower engine cannot do (yet), as config errors."""
    from fedtune.components import STRATEGIES

    problems = []
    if getattr(STRATEGIES.get(cfg.strategy.name), "pools_data", False):
        problems.append(
            Problem(
                "engine.name",
                cfg.engine.name,
                "the centralized baseline pools raw data",
                "run strategy 'centralized' with engine 'inprocess'",
            )
        )
    if cfg.adapter.kind == "lora_sb" and not cfg.adapter.sb_init.startswith("source:"):
        problems.append(
            Problem(
                "adapter.sb_init",
                cfg.adapter.sb_init,
                "on Flower every party computes the LoRA-SB init itself, from public data",
                "use adapter.sb_init: source:<public corpus>, e.g. source:stdlib",
            )
        )
    cls = STRATEGIES.get(cfg.strategy.name) if cfg.strategy.name in STRATEGIES else None
    if getattr(cls, "client_private", False) or getattr(cls, "uses_engine", False):
        problems.append(
            Problem(
                "engine.name",
                cfg.engine.name,
                f"strategy {cfg.strategy.name!r} keeps client-side state or evaluates peers' models on clients, "
                "which the Flower engine does not carry yet",
                "run it with engine 'inprocess'",
            )
        )
    if cfg.adapter.kind == "moe_lora" and isinstance(cfg.adapter.experts, list):
        problems.append(
            Problem(
                "adapter.experts",
                cfg.adapter.experts,
                "per-client expert counts are not carried to Flower clients yet",
                "give one count, or run with engine 'inprocess'",
            )
        )
    from fedtune.components import build_codec

    if build_codec(cfg).stateful or build_codec(cfg, downlink=True).stateful:
        problems.append(
            Problem(
                "codec",
                cfg.codec.name,
                "this codec keeps state between rounds (error feedback), which Flower clients do not carry yet",
                "use a stateless codec (identity, fp16, quantize) or engine 'inprocess'",
            )
        )
    down = cfg.downlink_codec if cfg.downlink_codec is not None else cfg.codec
    if cfg.secure_aggregation and (cfg.codec.name != "identity" or down.name != "identity"):
        problems.append(
            Problem(
                "codec.name" if cfg.codec.name != "identity" else "downlink_codec.name",
                cfg.codec.name if cfg.codec.name != "identity" else down.name,
                "with secure aggregation on Flower, SecAgg+ quantizes and masks the update itself",
                "use codec: identity (and no downlink_codec)",
            )
        )
    if cfg.attack.kind != "none":
        problems.append(
            Problem(
                "attack.kind",
                cfg.attack.kind,
                "attack injection is a simulation feature of the in-process engine",
                "set attack.kind: none, or run with engine 'inprocess'",
            )
        )
    if cfg.sampling.dropout > 0:
        problems.append(
            Problem(
                "sampling.dropout",
                cfg.sampling.dropout,
                "fault injection is for the in-process engine; on Flower, failures are real (timeouts)",
                "set sampling.dropout: 0 (use engine.timeout and sampling.min_updates)",
            )
        )
    for field in ("straggler_fraction", "deadline"):
        value = getattr(cfg.sampling, field)
        if value:
            problems.append(
                Problem(
                    f"sampling.{field}",
                    value,
                    "simulated stragglers and deadlines are for the in-process engine; on Flower, a reply "
                    "later than engine.timeout seconds is a recorded failure",
                    f"drop sampling.{field} (use engine.timeout and sampling.min_updates)",
                )
            )
    if cfg.evaluation.ood:
        problems.append(
            Problem(
                "evaluation.ood",
                True,
                "the out-of-distribution test pools every client's test data in one place",
                "set evaluation.ood: false, or run with engine 'inprocess'",
            )
        )
    if problems:
        raise ConfigError(problems)


def make_server_app(
    expected: int | None = None,
    cfg_yaml: str | None = None,
    *,
    resume: bool | None = None,
    overwrite: bool = False,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    """The ServerApp: runs fedtune's federated loop with Flower as the engine. In deployment the
    config and client count come from the run config, and a restarted ServerApp resumes from the
    run directory's checkpoint (resume=None: resume when an unfinished checkpoint exists)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from pathlib import Path

        from fedtune.recipes.federated import run_federated
        from fedtune.report import io

        text = cfg_yaml or str(context.run_config.get(CONFIG_KEY, ""))
        n = expected if expected is not None else int(context.run_config.get("fedtune-num-clients", 0))
        try:
            cfg = config_from_yaml(text)
            run_dir = Path(cfg.run_dir())
            again = (
                resume
                if resume is not None
                else ((run_dir / io.CHECKPOINT).exists() and not (run_dir / io.SUMMARY).exists())
            )
            run = run_federated(
                cfg,
                federation=flower_federation(grid, n, cfg.engine.timeout, context),
                resume=again,
                overwrite=overwrite or (resume is None and not again),
                progress=False,
            )
            if result is not None:
                result["run"] = run
        except BaseException as e:  # surfaced by the caller; Flower would only log it
            if result is not None:
                result["error"] = e
            raise

    return app


def run_simulation(cfg: ExperimentConfig, num_clients: int, *, resume: bool = False, overwrite: bool = False) -> Any:
    """Run the experiment on Flower's simulation runtime (Ray), one SuperNode per client."""
    import logging

    from flwr.simulation import run_simulation as flwr_run_simulation

    check_flower(cfg)
    text = config_to_yaml(cfg)
    result: dict[str, Any] = {}
    server = make_server_app(num_clients, text, resume=resume, overwrite=overwrite, result=result)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    flwr_run_simulation(
        server_app=server,
        client_app=make_client_app(text),
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"log_to_driver": False, "include_dashboard": False},
        },
    )
    if "error" in result:
        raise result["error"]
    if "run" not in result:
        raise FedtuneError("the Flower simulation ended without a result (see the log above)")
    return result["run"]


server_app = make_server_app()  # for `flwr run` (deployment): config from the run config

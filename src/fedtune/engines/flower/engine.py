"""`FlowerEngine`: jobs become Flower messages to the clients' SuperNodes, replies become
`ClientReply`, timeouts and errors `ClientFailure`; and the Flower federation (the server's side
of a Flower run: who the clients are, the server's copy of the model, the strategy)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedtune.client.run import ClientJob, ClientReply
from fedtune.codecs import make_codec
from fedtune.config import ExperimentConfig
from fedtune.data.report import stats_summary
from fedtune.engines.capabilities import FLOWER, Engine
from fedtune.engines.faults import FaultInjection, Faults, attackers
from fedtune.engines.federation import Federation, device_facts
from fedtune.engines.flower import profile
from fedtune.engines.flower.secagg_plus import secure_round
from fedtune.engines.flower.wire import from_record, to_record
from fedtune.errors import ConfigError, FedtuneError
from fedtune.seeding import torch_generator
from fedtune.types import AdapterState, ClientFailure

if TYPE_CHECKING:
    from fedtune.engines.parties import Parties
    from fedtune.strategies.trust_distill import TrustDistill


class FlowerEngine:
    """Runs jobs over a Flower Grid; with secure aggregation a round is a SecAgg+ round."""

    capabilities = FLOWER

    def __init__(
        self,
        grid: Grid,
        node_of: Mapping[str, int],
        timeout: float,
        *,
        context: Context | None = None,
        weights: Mapping[str, float] | None = None,
        secure: bool = False,
        run: str = "",
    ):
        self.grid = grid
        self.node_of = dict(node_of)
        self.client_of = {n: c for c, n in node_of.items()}
        self.timeout = timeout
        self.context = context
        self.weights = dict(weights or {})  # each client's weight in a SecAgg+ sum
        self.secure = secure
        self.run_token = run  # clients keep their state per run
        self.peers = None  # no peer scoring on Flower (capabilities)

    def private_of(self, cid: str) -> AdapterState | None:
        return None  # client-private tensors stay on the SuperNodes

    def refresh(self) -> None:
        """A SuperNode that restarted comes back with a new node id: ask new nodes who they are."""
        new = sorted(set(self.grid.get_node_ids()) - set(self.client_of))
        if not new:
            return
        msgs = [self.grid.create_message(_QUERY(), "query", n, group_id="query") for n in new]
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                continue
            cid = str(reply.content["info"]["client"])
            if cid in self.node_of:
                self.client_of.pop(self.node_of[cid], None)
            self.node_of[cid] = reply.metadata.src_node_id
            self.client_of[reply.metadata.src_node_id] = cid

    def send(self, kind: str, contents: Mapping[str, RecordDict], rnd: int) -> dict[str, Message | str]:
        self.refresh()
        msgs = [
            self.grid.create_message(content, kind, self.node_of[cid], group_id=f"{kind}-{rnd}")
            for cid, content in contents.items()
        ]
        out: dict[str, Message | str] = {cid: "timeout: no reply" for cid in contents}
        sent = time.time()
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            cid = self.client_of.get(reply.metadata.src_node_id)
            if cid is not None:
                out[cid] = f"error: {reply.error.reason}" if reply.has_error() else reply
        profile.record(side="server", kind=kind, round=rnd, clients=sorted(contents), sent=sent, received=time.time())
        return out

    def parties(self, cfg: ExperimentConfig, strategy: TrustDistill, model_dir: str, tokenizer: Any) -> Parties:
        """trust_distill's parties: each on its own SuperNode (`engines/flower/parties.py`)."""
        from fedtune.engines.flower.parties import FlowerParties
        from fedtune.engines.parties import public_corpus

        public = public_corpus(cfg, tokenizer, strategy.public, strategy.public_blocks, strategy.public_labels)
        return FlowerParties(self, int(public.numel()))  # the public corpus is public: the server may read it

    def run(self, jobs: Sequence[ClientJob], on_step: Any = None) -> list[ClientReply | ClientFailure]:
        if not jobs:
            return []
        if self.secure:
            if self.context is None:
                raise FedtuneError("secure aggregation on Flower needs the ServerApp's context")
            self.refresh()
            return secure_round(self.grid, self.context, jobs, self.node_of, self.client_of, self.weights, self.timeout)
        contents = {}
        for j in jobs:
            config = {"round": j.round, "participants": ",".join(j.participants), "run": j.run}
            config.update({f"transform-{k}": v for k, v in j.transform.items()})
            contents[j.client_id] = RecordDict({"payload": to_record(j.payload), "config": ConfigRecord(config)})  # type: ignore[arg-type]
        out: list[ClientReply | ClientFailure] = []
        answers = self.send("train", contents, jobs[0].round)
        for j in jobs:
            reply = answers[j.client_id]
            if isinstance(reply, str):
                out.append(ClientFailure(j.client_id, reply, len(j.payload)))
                continue
            up = from_record(reply.content.array_records["payload"])
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
            n = int(metrics.pop("num-examples"))
            out.append(ClientReply(j.client_id, up, n, metrics, len(j.payload), len(up)))
        return out

    def evaluate(self, states: Mapping[str, AdapterState], split: str = "test") -> dict[str, dict[str, Any]]:
        ident = make_codec("identity")
        encoded: dict[int, bytes] = {}
        contents = {}
        for cid, st in states.items():
            if id(st) not in encoded:
                encoded[id(st)], _ = ident.encode(st, None, torch_generator(0, "eval"))
            config = ConfigRecord({"round": 10**9, "split": split, "run": self.run_token})  # newest state
            contents[cid] = RecordDict({"payload": to_record(encoded[id(st)]), "config": config})
        out: dict[str, dict[str, Any]] = {}
        for cid, reply in self.send("evaluate", contents, 0).items():
            if not isinstance(reply, str) and "loss" in reply.content["metrics"]:  # down, or nothing to score
                out[cid] = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
                if "texts" in reply.content.config_records:
                    out[cid].update({k: str(v) for k, v in reply.content.config_records["texts"].items()})
        return out


def _QUERY() -> RecordDict:  # noqa: N802
    return RecordDict({"q": ConfigRecord({"what": "client"})})


def discover_clients(
    grid: Grid,
    expected: int,
    timeout: float,
    examples: dict[str, int] | None = None,
    stats: dict[str, dict[str, float]] | None = None,
) -> dict[str, int]:
    """Wait for `expected` SuperNodes, then ask each which client it is (and, into `examples`,
    how many training examples it has: SecAgg+ needs the largest weight in advance). Clients are
    listed in partition order, the order in-process runs list them in."""
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            break
        time.sleep(1.0)
    if len(nodes) < expected:
        raise FedtuneError(f"only {len(nodes)} of {expected} SuperNodes connected within {timeout:.0f} s")
    msgs = [grid.create_message(_QUERY(), "query", n, group_id="query") for n in nodes]
    node_of: dict[str, int] = {}
    order: dict[str, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise FedtuneError(f"SuperNode {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        info = reply.content["info"]
        node_of[str(info["client"])] = reply.metadata.src_node_id
        order[str(info["client"])] = int(info.get("order", 0))  # type: ignore[arg-type]
        if examples is not None and "examples" in info:
            examples[str(info["client"])] = int(info["examples"])  # type: ignore[arg-type]
        if stats is not None:  # the client's data report counts (the server never sees the data)
            stats[str(info["client"])] = {k[5:]: float(v) for k, v in info.items() if k.startswith("stat-")}  # type: ignore[arg-type]
    # the partition's client order (as in-process: sampling and evaluation samples pick the same clients)
    return dict(sorted(node_of.items(), key=lambda kv: (order[kv[0]], kv[0])))


def flower_federation(
    grid: Grid, expected: int, timeout: float, context: Context | None = None
) -> Callable[[ExperimentConfig], Federation]:
    """The server's side of a Flower run: it never touches client data."""

    def build(cfg: ExperimentConfig) -> Federation:
        from fedtune import components
        from fedtune.engines.federation import build_adapted_model, rank_per_client, resolve_auto, run_precision
        from fedtune.models.adapters import lora_scale
        from fedtune.models.load import load_tokenizer, resolve_model_dir

        examples: dict[str, int] = {}
        stats: dict[str, dict[str, float]] = {}
        node_of = discover_clients(grid, expected, timeout, examples, stats)
        ids = list(node_of)
        model_dir = resolve_model_dir(cfg.model, cfg.seed)
        limits = components.model_limit_problems(cfg, model_dir)
        if limits:
            raise ConfigError(limits)
        cfg, auto = resolve_auto(cfg, ids, model_dir)  # the same picks as every SuperNode's
        ranks = rank_per_client(cfg, ids)
        tokenizer = load_tokenizer(model_dir)
        cfg, precision, slow = run_precision(cfg)  # the server's device; each SuperNode resolves its own
        model, adapter_cfg = build_adapted_model(cfg, model_dir, ranks, tokenizer)
        strategy = components.build_strategy(cfg, components.run_context(cfg, ids, lora_scale(model)))
        weights = {c: strategy.capabilities.weight(n) for c, n in examples.items()}
        from fedtune.report.io import run_token

        token = run_token(Path(cfg.run_dir()))
        engine: Engine = FlowerEngine(
            grid, node_of, timeout, context=context, weights=weights, secure=cfg.secure_aggregation, run=token
        )
        s = cfg.sampling
        faults = Faults(s.dropout, s.straggler_fraction, s.straggler_slowdown, s.deadline)
        if cfg.engine.name == "flower-sim" and (faults.dropout > 0 or faults.timed):
            engine = FaultInjection(engine, faults, cfg.seed)  # the same seeded faults as in-process
        round0 = {**stats_summary(stats), **device_facts(model, precision, slow), **auto}  # the server's
        if cfg.attack.kind != "none":  # simulated attackers (a seeded set, the same on every side)
            round0["attackers"] = sorted(attackers(ids, cfg.attack.fraction, cfg.seed))
        return Federation(ids, model, model_dir, adapter_cfg, strategy, engine, round0=round0)

    return build

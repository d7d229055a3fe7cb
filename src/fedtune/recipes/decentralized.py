"""The decentralized loop, top to bottom, with no server (strategies whose capabilities declare
`peer_to_peer`; `run_federated` hands them here):

    for rnd in start..rounds:
        members = the peers online in rnd                    seeded: every peer computes it
        roles   = sampler.roles(rnd, members)                who trains and who mixes, computed alike
        held    = the PeerState (x, w) of each peer involved, read from its ClientState (the store)
        own     = fetch: each trainer's start (gossip: its own; MoDeST: the last aggregate, a message)
        replies = engine.run(jobs)                           each trainer: run_client on z = x / w
        trained = x + delta for the trainers that replied (the round's live trainers)
        coef    = strategy.coefficients(rnd, live, roles)    {receiver: {sender: c}}, a row per receiver
        sent    = strategy.message(state)                    trainable keys (+ w): what goes on the wire
        inbox   = each receiver's messages from its senders  bytes: len of each encoded message (`codec`)
        mixed   = strategy.mix(j, own_j, inbox[j], coef[j])  each receiver mixes locally
        store   : version rnd of each trainer's and receiver's ClientState holds its new PeerState
        evaluate each scored peer's model (from the store) -> records -> checkpoint (round, init, ledger)
    export every peer's adapter -> plots -> summary.json

The peers' models never sit in a strategy state or the checkpoint: each is in its own
`ClientState`, versioned by round like every client state, so resumed == uninterrupted. The store
is the engine's (`Federation.store`), and the engine may be wrapped by `FaultInjection`: a peer that
drops out does not train, send or mix that round. In one process the hand-off of a peer's own
model to its client step is local (not counted); every message between peers is counted once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune import components
from fedtune.client.run import ClientJob, ClientState, PeerState
from fedtune.codecs.base import Codec
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.federation import Federation, variants_per_client
from fedtune.engines.plan import privacy_facts
from fedtune.errors import FedtuneError
from fedtune.models.adapters import get_state
from fedtune.models.export import export_adapters
from fedtune.peer_sampling import Roles
from fedtune.privacy.accounting import sample_epsilons
from fedtune.recipes.federated import (
    AfterRound,
    RunResult,
    budget_stop,
    dp_sgd_stop,
    log_round,
    receive,
    round_extras,
    run_jobs,
)
from fedtune.recipes.ledger import Ledger, trained_replies, update_ledger
from fedtune.report import io
from fedtune.report.plots import plot_runs
from fedtune.report.records import client_records, eval_records, round_summary
from fedtune.report.summary import progress_bars, round_line, setup_lines, summary_json
from fedtune.report.trackers import Tracker
from fedtune.sampling import evaluation_clients, online_clients
from fedtune.seeding import torch_generator
from fedtune.strategies.decentralized import (
    PUSH_SUM_WEIGHT,
    PeerStrategy,
    as_peer_strategy,
    is_identity,
    pack_message,
    unpack_message,
)
from fedtune.types import AdapterState, add_states

PEER_SAMPLING = "seeded hash of (seed, round, peer): every peer computes the round's roles (public)"


def peer_state(state: ClientState, init: AdapterState) -> PeerState:
    """A peer's (x, w) from its client state (a peer that never mixed holds the initial adapter)."""
    return state.peer if state.peer is not None else PeerState(init)


def peer_models(
    store: Any, ids: Sequence[str], init: AdapterState, sources: Mapping[str, str] | None = None
) -> dict[str, AdapterState]:
    """The model each peer holds, z = x / w from its newest client state, or the one it would
    fetch from `sources[peer]` (MoDeST: the last round's aggregate)."""
    src = sources or {c: c for c in ids}
    return {c: peer_state(store.get(src[c]), init).model() for c in ids}


def final_models(
    cfg: ExperimentConfig, strategy: PeerStrategy, store: Any, ids: Sequence[str], init: AdapterState, rnd: int
) -> dict[str, AdapterState]:
    """The model each peer holds after round `rnd`: the one it would start round rnd + 1 from
    (gossip: its own; MoDeST: an aggregate of round rnd)."""
    s = cfg.sampling
    sampler = strategy.sampler(s.fraction, s.min_clients, s.scheme)
    roles = sampler.roles(rnd, online_clients(ids, s.availability, cfg.seed, rnd)) if rnd > 0 else None
    return peer_models(store, ids, init, strategy.sources(rnd + 1, ids, roles))


def run_peers(
    cfg: ExperimentConfig,
    fed: Federation,
    run_dir: Path,
    t_start: float,
    resume: bool,
    progress: bool,
    after_round: AfterRound | None,
    console: Console,
    trackers: Sequence[Tracker] = (),
) -> RunResult:
    # 1. the peers, their store (the engine's), the round's sampler and the local hand-off codec
    strategy = as_peer_strategy(fed.strategy, cfg.strategy.name)
    engine, store, ids = fed.engine, fed.store, fed.client_ids
    caps = strategy.capabilities
    if store is None:
        raise FedtuneError(
            f"strategy {cfg.strategy.name!r} keeps each peer's model in its client state; "
            f"engine {cfg.engine.name!r} gives this process no client-state store"
        )
    s = cfg.sampling
    sampler = strategy.sampler(s.fraction, s.min_clients, s.scheme)
    own_codec = up_codec = components.local_codec()  # z to the peer's own step and its delta back: local
    wire = Wire(components.build_codec(cfg), cfg.seed)  # what each peer message travels as
    chat = "data_chat_template" in fed.round0
    metrics_path, token = run_dir / io.METRICS, io.run_token(run_dir)
    for line in (
        []
        if resume
        else setup_lines({**fed.round0, **fed.source_facts}, cfg.data.max_chars_per_doc, cfg.data.max_docs_per_label)
    ):
        console.print(line, highlight=False)

    # 2. start or resume (the checkpoint holds no peer model: they are in the peers' states)
    if resume:
        ckpt = io.load_checkpoint(run_dir / io.CHECKPOINT)
        start, init, ledger = ckpt["round"] + 1, ckpt["init"], Ledger(**ckpt["ledger"])
        kept = [r for r in io.read_jsonl(metrics_path) if r["round"] <= ckpt["round"]]
        io.write_jsonl(metrics_path, kept)  # drop records of a round that was never checkpointed
        console.print(f"resuming {run_dir} after round {ckpt['round']}")
        ledger.resume_setup += time.perf_counter() - t_start  # this process's set-up (summary.json's split)
    else:
        io.write_atomic(run_dir / io.CONFIG, config_to_yaml(cfg))
        init, ledger, start = get_state(fed.model), Ledger(), 1
        watched = evaluation_clients(ids, cfg.evaluation.clients, cfg.seed)
        base = eval_records(0, caps, engine, watched, init, None, cfg.evaluation.ood, cfg.evaluation.val)
        summary = {"round": 0, "client": None, **round_summary(base, 0, 0, 0, 0), **fed.round0}
        summary.update(privacy_facts(cfg, caps), sampling_randomness=PEER_SAMPLING)
        summary["setup_seconds"] = time.perf_counter() - t_start
        log_round(metrics_path, trackers, 0, client_records(0, ids, [], base, [], [], True), summary)

    # 3. rounds
    bars = progress_bars(console, progress)
    with bars:
        round_task = bars.add_task("rounds", total=cfg.rounds, completed=start - 1)
        step_task = bars.add_task("peer", total=1)

        def on_step(cid: str, step: int, total: int, loss: float) -> None:
            bars.update(step_task, description=f"peer {cid} loss {loss:.3f}", completed=step, total=total)

        for rnd in range(start if ledger.stopped is None else cfg.rounds + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            roles = sampler.roles(rnd, online_clients(ids, s.availability, cfg.seed, rnd))
            previous = (
                sampler.roles(rnd - 1, online_clients(ids, s.availability, cfg.seed, rnd - 1)) if rnd > 1 else None
            )

            # fetch: each trainer's starting model (gossip: its own; MoDeST: the last round's aggregate)
            sources = strategy.sources(rnd, roles.trainers, previous)
            needed = sorted({*sources.values(), *roles.trainers, *roles.mixers})
            held = {p: peer_state(store.get(p, before=rnd), init) for p in needed}
            own, fetched = fetch(strategy, sources, held, wire, rnd)

            # train: each trainer runs the client step on its model z = x / w, then x <- x + delta
            models = {c: p.model() for c, p in own.items()}
            jobs = own_jobs(rnd, models, roles.trainers, own_codec, cfg.seed, token)
            replies = run_jobs(engine, jobs, on_step, rnd, run_dir)
            updates, failures, _ = receive(replies, jobs, up_codec, {}, models, cfg, caps)
            trained = {
                u.client_id: replace(own[u.client_id], x=add_states(own[u.client_id].x, u.delta)) for u in updates
            }
            t_train = time.perf_counter()

            # exchange: the live trainers message their receivers, then each receiver mixes its inbox
            links = Links(s.link_drop, cfg.seed)
            mixed, sent, metrics = exchange(strategy, rnd, trained, roles, held, engine.peers, links, wire)
            for j in sorted({*trained, *mixed}):  # version rnd of each peer's own state
                store.put(j, replace(store.get(j, before=rnd + 1), peer=mixed.get(j) or trained[j]), rnd)
            per_peer = merge_bytes(fetched, sent)
            if any(fetched):
                metrics["fetch_messages"] = sum(1 for t, src in sources.items() if t != src)
            up = sum(p["bytes_up"] for p in per_peer.values())
            ran = trained_replies(replies)
            eps = sample_epsilons(ledger.dp_steps, ran, cfg.train.dp_sgd) if cfg.train.dp_sgd else {}
            stop = budget_stop(cfg, ledger.cum_bytes + up) or dp_sgd_stop(cfg, eps)
            t_agg = time.perf_counter()

            # evaluate each scored peer's own model, log, checkpoint
            last = rnd == cfg.rounds or stop is not None
            evals: dict[str, dict[str, float]] = {}
            if last or rnd % cfg.evaluation.every == 0:
                ev = cfg.evaluation
                scored = sorted(set(evaluation_clients(ids, ev.clients, cfg.seed)) | set(roles.trainers))
                personal = peer_models(store, scored, init, strategy.sources(rnd + 1, scored, roles))
                evals = eval_records(rnd, caps, engine, scored, init, personal, ev.ood, ev.val)
            t_eval = time.perf_counter()
            took_part = sorted({*roles.trainers, *roles.mixers})  # a peer that only mixes is in the records too
            dp = {c: {"sample_epsilon": e} for c, (e, _) in eps.items()}
            extra = {c: {**per_peer.get(c, {}), **dp.get(c, {})} for c in {*per_peer, *dp}}
            recs = client_records(rnd, ids, took_part, evals, updates, failures, caps.transmits, extra)
            summary = round_summary(evals, up, 0, ledger.cum_bytes, len(failures))
            summary.update(metrics)
            summary.update(train_seconds=t_train - t0, aggregate_seconds=t_agg - t_train, eval_seconds=t_eval - t_agg)
            ledger = update_ledger(ledger, summary, ran, eps, stop)
            summary.update(round_extras(cfg, updates, failures, False, ledger, chat))
            summary["wall_seconds"] = time.perf_counter() - t0
            t_io = time.perf_counter()
            log_round(metrics_path, trackers, rnd, recs, summary)
            io.save_checkpoint(run_dir / io.CHECKPOINT, {"round": rnd, "init": init, "ledger": ledger.saved(t_start)})
            ledger.io_seconds += time.perf_counter() - t_io
            bars.update(round_task, completed=rnd)
            if progress and not console.is_terminal:
                console.print(round_line(rnd, cfg.rounds, summary), highlight=False)
            if after_round is not None:
                after_round(rnd)
            if stop is not None:
                console.print(f"[yellow]stopping after round {rnd}: {stop}[/yellow]")
                break

    # 4. export every peer's own model + report
    records = io.read_jsonl(metrics_path)
    personal = final_models(cfg, strategy, store, ids, init, max(r["round"] for r in records))
    export_adapters(run_dir, fed, None, personal, engine.private_of, variants_per_client(cfg, ids), caps.client_private)
    plot_runs({cfg.name: records}, run_dir / "plots")
    io.write_atomic(run_dir / io.SUMMARY, summary_json(cfg, records, ledger.wall(t_start), ledger))
    return RunResult(run_dir, records, max(r["round"] for r in records))


@dataclass(frozen=True)
class Wire:
    """How a peer message travels: encoded by the run's `codec` (`pack_message`), with a seeded
    generator per (kind, round, sender) so every process encodes a message alike; one encoding
    per sender and round goes to all its receivers. `send` gives the bytes and what a receiver
    decodes from them (the sender mixes its own exact state)."""

    codec: Codec = field(default_factory=components.local_codec)
    seed: int = 0

    def send(self, msg: AdapterState, kind: str, rnd: int, sender: str) -> tuple[bytes, AdapterState]:
        data = pack_message(self.codec, msg, torch_generator(self.seed, "peer-message", kind, rnd, sender))
        return data, (msg if is_identity(self.codec) else self.receive(data))

    def receive(self, data: bytes) -> AdapterState:
        """The tensors a receiver mixes, from a message's bytes."""
        return unpack_message(self.codec, data)


def fetch(
    strategy: PeerStrategy, sources: Mapping[str, str], held: Mapping[str, PeerState], wire: Wire = Wire(), rnd: int = 0
) -> tuple[dict[str, PeerState], dict[str, dict[str, int]]]:
    """Each trainer's starting state: its own, or the model it fetches from its source (a
    message: `strategy.message` of the source's state, encoded by `wire`, counted once), and
    the bytes per peer."""
    own: dict[str, PeerState] = {}
    moved: list[dict[str, dict[str, int]]] = []
    for t, src in sorted(sources.items()):
        if src == t:
            own[t] = held[t]
            continue
        data, msg = wire.send(strategy.message(held[src]), "fetch", rnd, src)
        own[t] = strategy.adopt(held[t], msg)
        size = len(data)
        moved.append({src: {"bytes_up": size}, t: {"bytes_down": size}})
    return own, merge_bytes(*moved)


@dataclass(frozen=True)
class Links:
    """Unreliable links (`sampling.link_drop`): message i -> j of round `rnd` is lost when a draw
    seeded by (seed, round, i, j) falls below `drop`, the same draw in any process."""

    drop: float = 0.0
    seed: int = 0

    def lost(self, rnd: int, sender: str, receiver: str) -> bool:
        if self.drop <= 0.0:
            return False
        return (
            float(torch.rand((), generator=torch_generator(self.seed, "link-drop", rnd, sender, receiver))) < self.drop
        )


def delivered(row: Mapping[str, float], me: str, lost: set[str], push_sum: bool) -> dict[str, float]:
    """A receiver's row of coefficients after its lost messages: a lost sender's weight moves to
    the receiver's own model (as an absent neighbour's does; the row stays stochastic), or, when
    the receiver is not in its row (a MoDeST aggregator), the row is renormalised over what
    arrived. Under push-sum the lost share is lost (x and w together, so z = x / w stays a
    weighted average of the peers' models)."""
    kept = {i: c for i, c in row.items() if i not in lost}
    if push_sum or not lost:
        return kept
    gone = sum(c for i, c in row.items() if i in lost)
    if me in kept:
        return {**kept, me: kept[me] + gone}
    total = sum(kept.values())
    return {i: c / total for i, c in kept.items()} if total > 0 else {}


def exchange(
    strategy: PeerStrategy,
    rnd: int,
    trained: Mapping[str, PeerState],
    roles: Roles | None = None,
    held: Mapping[str, PeerState] | None = None,
    scorer: Any = None,
    links: Links = Links(),
    wire: Wire = Wire(),
) -> tuple[dict[str, PeerState], dict[str, dict[str, int]], dict[str, Any]]:
    """One round's messages after training (`trained`: each live trainer's (x, w) after its step;
    `held`: the other receivers' states): each sender sends `strategy.message` to the receivers
    whose row of the round's coefficients names it, and each receiver mixes its inbox with its own
    row, after scoring on its own data the models it asks for (`strategy.to_score`; Bristle's
    integrator) through `scorer` (the engine's `peers`: each receiver's own data, local, no
    bytes). Returns the receivers' mixed states, each peer's bytes sent and received (lengths of the
    encoded messages (`wire`), each message once) and the round's metrics (the strategy's, the largest
    factor-mixing error, the message count). Gossip: the live peers are senders and receivers.
    A message lost on its link (`links`) is counted as sent, not received (`delivered`)."""
    live = sorted(trained)
    coef = strategy.coefficients(rnd, live, roles or Roles(tuple(live), tuple(live)))
    peers = {**(held or {}), **trained}
    senders = sorted({i for row in coef.values() for i in row})
    own = {i: strategy.message(peers[i]) for i in senders}
    wired = {i: wire.send(own[i], "mix", rnd, i) for i in senders}
    sent = {i: m for i, (_, m) in wired.items()}  # what a receiver decodes
    size = {i: len(data) for i, (data, _) in wired.items()}
    per_peer = {c: {"bytes_up": 0, "bytes_down": 0} for c in sorted({*senders, *coef})}
    lost = {j: {i for i in coef[j] if i != j and links.lost(rnd, i, j)} for j in coef}
    for j in sorted(coef):
        for i in sorted(lost[j]):
            per_peer[i]["bytes_up"] += size[i]
    push_sum = any(PUSH_SUM_WEIGHT in m for m in own.values())
    coef = {j: delivered(coef[j], j, lost[j], push_sum) for j in coef}
    coef = {j: row for j, row in coef.items() if row}  # a receiver nothing reached keeps its model
    inbox = {j: {i: sent[i] for i in coef[j] if i != j} for j in coef}
    wanted = {j: strategy.to_score(rnd, j, peers[j], inbox[j]) for j in sorted(coef)}
    losses = scorer.receiver_losses(wanted) if scorer is not None and any(wanted.values()) else {}
    mixed, error = {}, 0.0
    for j in sorted(coef):
        for i in inbox[j]:
            per_peer[i]["bytes_up"] += size[i]
            per_peer[j]["bytes_down"] += size[i]
        mixed[j], e = strategy.mix(j, peers[j], inbox[j], coef[j], losses.get(j))
        error = max(error, e)
    metrics = strategy.round_metrics(coef, {j: p.model() for j, p in mixed.items()})
    metrics.update(agg_error=error, gossip_messages=sum(len(m) for m in inbox.values()))
    if links.drop > 0:
        metrics["dropped_messages"] = sum(len(v) for v in lost.values())
    return mixed, per_peer, metrics


def merge_bytes(*parts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Per-peer byte counts added up ({peer: {bytes_up, bytes_down}})."""
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for c, b in part.items():
            mine = out.setdefault(c, {"bytes_up": 0, "bytes_down": 0})
            for k, v in b.items():
                mine[k] += v
    return out


def own_jobs(
    rnd: int, models: Mapping[str, AdapterState], trainers: Sequence[str], codec: Codec, seed: int, token: str
) -> list[ClientJob]:
    """Each trainer's client-step job on its own model (a local hand-off, not a message)."""
    out = []
    for c in trainers:
        payload, _ = codec.encode(models[c], None, torch_generator(seed, "peer", rnd, c))
        out.append(ClientJob(rnd, c, payload, tuple(trainers), {}, token))
    return out

"""One peer as its own OS process (`fedtune peer CONFIG --id N`): the decentralized loop of
`recipes/decentralized.py` seen from a single peer, with real messages over hivemind
(`engines/p2p.Swarm`). No server and no shared state: every peer computes the round's roles and
mixing coefficients itself from the config, holds only its own data shard (shards are built on
first use, and a peer uses only its own) and keeps its own state on its own disk.

    join: register in the DHT, wait until every peer has joined (before round 1)
    for rnd in start..rounds:
        roles   = sampler.roles(rnd, members)              the same sampler, computed alike
        own     = my PeerState from my store; a trainer whose source is another peer (MoDeST)
                  receives that peer's message ("fetch") by the deadline, else starts from its own
        train   : run_client on z = x / w; x <- x + delta; announce "trained" in the DHT
        live    = the trainers that announced before the deadline (the round barrier)
        coef    = strategy.coefficients(rnd, live, roles)   the simulator's coefficients
        send    : strategy.message(mine), encoded by `codec` (`Wire`), to each receiver whose row names me
        inbox   = the messages of my row's senders that arrive by the deadline; a missing
                  one is a lost message, handled as the simulator does (`delivered`)
        scored  = my losses, on my own data, of the models strategy.to_score asks for (Bristle)
        mixed   = strategy.mix(me, mine, inbox, row, losses)   the simulator's mix
        store   : version rnd of my ClientState; evaluate my model; append my record; announce "done"

Records: <run>/peers/<peer>/metrics.jsonl, one line per round the peer took part in: its client
record exactly as the in-process run writes it (`client_records`) under "record", and what only
this peer saw under "peer" (its row of coefficients, who was live, who was missing, its
mixing error, its seconds). `recipes/swarm.py` merges them into the run's records.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune import components
from fedtune.client.run import ClientJob
from fedtune.codecs.base import Codec
from fedtune.config import ExperimentConfig, config_to_yaml
from fedtune.engines.capabilities import Engine
from fedtune.engines.federation import variants_per_client
from fedtune.engines.inprocess import inprocess_federation, with_store
from fedtune.engines.p2p import Swarm
from fedtune.engines.plan import privacy_facts
from fedtune.errors import FedtuneError
from fedtune.models.adapters import get_state
from fedtune.models.export import export_adapters
from fedtune.peer_sampling import PeerSampler
from fedtune.recipes.decentralized import PEER_SAMPLING, Wire, delivered, peer_state
from fedtune.recipes.federated import receive, run_jobs
from fedtune.report import io
from fedtune.report.records import client_records, eval_records
from fedtune.sampling import evaluation_clients, online_clients
from fedtune.seeding import torch_generator
from fedtune.strategies.decentralized import PUSH_SUM_WEIGHT, PeerStrategy, as_peer_strategy
from fedtune.types import ClientFailure, add_states

PEERS_DIR = "peers"
PROGRESS = "progress.json"  # {"round": the last round this peer finished}
FACTS = "facts.json"  # the round-0 facts (data, device, privacy) this peer saw


def swarm_name(cfg: ExperimentConfig) -> str:
    """The default swarm name: a hash of the config, so peers given the same config meet."""
    return "fedtune-" + hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]


def peer_dir(run_dir: Path, peer: str) -> Path:
    return Path(run_dir) / PEERS_DIR / peer.replace("/", "_")


def resolve_peer(ids: list[str], given: str) -> str:
    """A peer id from --id: a client id of the config, or its index in the sorted ids."""
    if given in ids:
        return given
    if given.isdigit() and int(given) < len(ids):
        return sorted(ids)[int(given)]
    raise FedtuneError(
        f"--id {given!r} is neither a client id of this config nor an index below {len(ids)}; "
        f"the peers are {', '.join(sorted(ids))} (by index 0..{len(ids) - 1})"
    )


def run_peer(
    cfg: ExperimentConfig,
    given_id: str,
    run_dir: Path,
    swarm: str,
    initial_peers: list[str],
    host_maddrs: list[str],
    console: Console,
) -> Path:
    """Run peer `given_id` of `cfg` until the last round; returns its directory."""
    t_start = time.perf_counter()
    # 1. this peer's federation: every client id is known (the partition is public), only its shard is built
    fed = inprocess_federation(cfg.model_copy(update={"output_dir": str(run_dir)}))  # its store is replaced below
    ids, strategy = fed.client_ids, as_peer_strategy(fed.strategy, cfg.strategy.name)
    me = resolve_peer(ids, given_id)
    mine = peer_dir(run_dir, me)
    mine.mkdir(parents=True, exist_ok=True)
    store = type(fed.store)(mine / "clients", fed.store.initial)  # my state on my own disk
    engine = with_store(fed.engine, store)
    caps, s, timeout = strategy.capabilities, cfg.sampling, cfg.engine.timeout
    sampler = strategy.sampler(s.fraction, s.min_clients, s.scheme)
    own_codec = up_codec = components.local_codec()  # my model to my own step and its delta back: local
    wire = Wire(components.build_codec(cfg), cfg.seed)  # my messages, encoded as the simulator does
    init = get_state(fed.model)
    metrics_path, progress_path = mine / io.METRICS, mine / PROGRESS

    # 2. join the swarm and wait for the whole membership (a restarted peer finds it there)
    net = Swarm(swarm, me, initial_peers, host_maddrs)
    try:
        io.write_atomic(mine / "maddrs.txt", "\n".join(net.maddrs()) + "\n")
        console.print(f"peer {me} listening; others join with --initial-peers {' '.join(net.maddrs())}")
        members = net.join(ids, time.monotonic() + cfg.engine.join_timeout)
        if set(members) != set(ids):
            missing = sorted(set(ids) - set(members))
            raise FedtuneError(
                f"peer {me!r}: peers {', '.join(missing)} did not join swarm {swarm!r} within engine.join_timeout = "
                f"{cfg.engine.join_timeout:g} s; start them with --initial-peers {' '.join(net.maddrs())} "
                "(or raise engine.join_timeout)"
            )
        t_joined = time.perf_counter()
        done = json.loads(progress_path.read_text())["round"] if progress_path.exists() else 0
        swarm_done = max([int(v) for v in net.read("done").values()] + [done])
        start = swarm_done + 1  # a restarted peer rejoins the swarm's current round from its own state
        if done == 0 and not metrics_path.exists():
            watched = evaluation_clients(ids, cfg.evaluation.clients, cfg.seed)
            base = eval_records(0, caps, engine, [me] if me in watched else [], init, None, False, cfg.evaluation.val)
            rec = client_records(0, ids, [], base, [], [], True)
            facts = {**fed.round0, **privacy_facts(cfg, caps), "sampling_randomness": PEER_SAMPLING}
            facts.update(setup_seconds=t_joined - t_start)
            io.write_atomic(mine / FACTS, json.dumps(facts, default=str))
            io.append_jsonl(metrics_path, [{"round": 0, "record": rec[0] if rec else None, "peer": {}}])
        if start > 1:
            kept = max(store.versions(me), default=0)  # the state it stored last, on its own disk
            console.print(f"peer {me}: rejoining at round {start} from its own state of round {kept}")

        # 3. rounds
        for rnd in range(start, cfg.rounds + 1):
            net.refresh()
            others = {p: int(r) for p, r in net.read("done").items() if p != me}
            if others and max(others.values()) >= rnd:  # a late (restarted) peer: the swarm is past rnd
                console.print(f"peer {me}: round {rnd} is over in the swarm; skipped", highlight=False)
                continue
            line = peer_round(cfg, me, rnd, ids, strategy, engine, store, init, net, sampler, own_codec, up_codec, wire)
            if line is not None:
                io.append_jsonl(metrics_path, [line])
            io.write_atomic(progress_path, json.dumps({"round": rnd}))
            net.announce("done", rnd)
            console.print(f"peer {me}: round {rnd}/{cfg.rounds} done", highlight=False)

        # 4. export my own model (a gossip peer's own; the start of a next round)
        personal = {me: peer_state(store.get(me), init).model()}
        variants = variants_per_client(cfg, ids)
        export_adapters(Path(run_dir), fed, None, personal, engine.private_of, variants, caps.client_private)
        # linger until every peer that is up has finished (its DHT records and messages stay reachable)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = net.read("done")
            if all(int(done.get(p, 0)) >= cfg.rounds for p in set(ids) - net.down(ids)):
                break
            time.sleep(0.2)
    finally:
        net.close()
    return mine


def peer_round(
    cfg: ExperimentConfig,
    me: str,
    rnd: int,
    ids: list[str],
    strategy: PeerStrategy,
    engine: Engine,
    store: Any,
    init: Any,
    net: Swarm,
    sampler: PeerSampler,
    own_codec: Codec,
    up_codec: Codec,
    wire: Wire,
) -> dict[str, Any] | None:
    """Peer `me`'s round `rnd` (module docstring); its metrics line, or None if it had no role."""
    t0, s, timeout = time.perf_counter(), cfg.sampling, cfg.engine.timeout
    roles = sampler.roles(rnd, online_clients(ids, s.availability, cfg.seed, rnd))
    previous = sampler.roles(rnd - 1, online_clients(ids, s.availability, cfg.seed, rnd - 1)) if rnd > 1 else None
    sources = strategy.sources(rnd, roles.trainers, previous)
    if me not in {*roles.trainers, *roles.mixers, *sources.values()}:
        return None
    held = peer_state(store.get(me, before=rnd), init)
    up = down = 0
    notes: list[str] = []
    reached: list[str] = []  # the peers my messages of this round were delivered to (announced: `past`)

    # fetch: send my state to the trainers that start from it; receive mine if it is someone else's
    for t, src in sorted(sources.items()):
        if src == me and t != me:
            data, _ = wire.send(strategy.message(held), "fetch", rnd, me)
            why = net.send(t, "fetch", rnd, data, timeout)
            notes += [why] if why else []
            up += 0 if why else len(data)
            reached += [] if why else [t]
    if reached:
        net.announce(f"sent/{rnd}", reached)
    own = held
    src = sources.get(me, me)
    if src != me:
        got = net.receive("fetch", rnd, [src], time.monotonic() + timeout, lambda m: past(net, m, rnd, me))
        if src in got:
            own, down = strategy.adopt(held, wire.receive(got[src])), down + len(got[src])
        else:
            notes.append(f"no model from source {src!r} within engine.timeout = {timeout:g} s; trained from my own")

    # train (a trainer): the same client step as the simulator, then x <- x + delta
    updates: list[Any] = []
    failures: list[ClientFailure] = []
    mine = own
    if me in roles.trainers:
        payload, _ = own_codec.encode(own.model(), None, torch_generator(cfg.seed, "peer", rnd, me))
        job = ClientJob(rnd, me, payload, tuple(roles.trainers), {}, net.swarm)
        replies = run_jobs(engine, [job], None, rnd, Path(cfg.run_dir()))
        updates, failures, _ = receive(replies, [job], up_codec, {}, {me: own.model()}, cfg, strategy.capabilities)
        if updates:
            mine = replace(own, x=add_states(own.x, updates[0].delta))
            net.announce(f"trained/{rnd}", True)
    t_train = time.perf_counter()

    # the round barrier: who trained (the same live set as the simulator's when no one fails)
    live = sorted(net.gather(f"trained/{rnd}", roles.trainers, time.monotonic() + timeout, skip_down=True))
    coef = strategy.coefficients(rnd, live, roles)
    if updates:
        data, _ = wire.send(strategy.message(mine), "mix", rnd, me)
        for j in sorted(coef):
            if j != me and me in coef[j]:
                why = net.send(j, "mix", rnd, data, timeout)
                notes += [why] if why else []
                up += 0 if why else len(data)
                reached += [] if why else [j]
        net.announce(f"sent/{rnd}", reached)  # a receiver waits for what was sent to it, even past my round
    row, error, missing, inbox = dict(coef.get(me, {})), 0.0, [], {}
    if row:
        senders = [i for i in row if i != me]
        got = net.receive("mix", rnd, senders, time.monotonic() + timeout, lambda m: past(net, m, rnd, me))
        inbox = {i: wire.receive(b) for i, b in got.items()}
        down += sum(len(b) for b in got.values())
        missing = sorted(set(senders) - set(got))
        push_sum = PUSH_SUM_WEIGHT in strategy.message(mine)
        row = delivered(row, me, set(missing), push_sum)  # the simulator's rule for a lost message
        if row:
            inbox = {i: m for i, m in inbox.items() if i in row}
            # Bristle's integrator: I score, on my own data, the models I ask for (local: nothing travels)
            wanted = strategy.to_score(rnd, me, mine, inbox)
            losses = engine.peers.receiver_losses({me: wanted}).get(me) if wanted else None
            mine, error = strategy.mix(me, mine, inbox, row, losses)
    t_mix = time.perf_counter()
    if updates or row:
        store.put(me, replace(store.get(me, before=rnd + 1), peer=mine), rnd)

    # evaluate my own model on my own data, and my record (the simulator's format)
    ev = cfg.evaluation
    evals: dict[str, dict[str, Any]] = {}
    if rnd == cfg.rounds or rnd % ev.every == 0:
        scored = set(evaluation_clients(ids, ev.clients, cfg.seed)) | set(roles.trainers)
        if me in scored:
            evals = eval_records(rnd, strategy.capabilities, engine, [me], init, {me: mine.model()}, False, ev.val)
    took_part = [me] if me in {*roles.trainers, *roles.mixers} else []
    extra = {me: {"bytes_up": up, "bytes_down": down}}
    recs = client_records(rnd, [me], took_part, evals, updates, failures, strategy.capabilities.transmits, extra)
    # the strategy's graph-wide facts (a static graph's spectral gap); the live peers' consensus
    # distance and the round's gap need every peer's numbers: recipes/swarm.py computes them
    # (empty models: only the facts that do not depend on them are kept)
    facts = strategy.round_metrics(coef, {p: {} for p in sorted(coef)}) if coef else {}
    graph = {k: v for k, v in facts.items() if k.startswith("graph_")}
    peer = {
        "graph": graph,
        "trainers": list(roles.trainers),
        "fetched": int(down > 0 and src != me and own is not held),
        "live": live,
        "row": row,
        "received": sorted(inbox),
        "missing": missing,
        "notes": notes,
        "agg_error": error,
        "train_seconds": t_train - t0,
        "exchange_seconds": t_mix - t_train,
        "wall_seconds": time.perf_counter() - t0,
    }
    return {"round": rnd, "record": recs[0] if recs else None, "peer": peer}


def past(net: Swarm, missing: set[str], rnd: int, me: str) -> bool:
    """No message will come from `missing`: each is down, or finished round `rnd` without sending
    to me (I am late). A message a sender delivered to my daemon is waited for until the deadline."""
    done, sent = net.read("done"), net.read(f"sent/{rnd}")
    return all(p in net.down({p}) or (int(done.get(p, 0)) >= rnd and me not in sent.get(p, [])) for p in missing)

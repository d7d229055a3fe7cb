"""Scale: 10,000 registered clients, and only the sampled (and watched) ones cost. On the landed
code this run tokenized and packed all 10,000 clients up front (minutes) and evaluated every one
of them after every round."""

import json
from pathlib import Path

from fedtune.data.shards import ClientShards
from fedtune.recipes.federated import run_federated
from fedtune.sampling import evaluation_clients


def test_ten_thousand_clients_cost_only_the_clients_that_take_part(tiny_cfg, monkeypatch) -> None:
    built: list[str] = []
    real = ClientShards._build_text

    def counted(self: ClientShards, cid: str):  # type: ignore[no-untyped-def]
        built.append(cid)
        return real(self, cid)

    monkeypatch.setattr(ClientShards, "_build_text", counted)
    n = 10_000
    cfg = tiny_cfg(
        "data.source=friends", "data.labels=null", "data.max_docs_per_label=null", "data.block_size=8",
        "data.val_fraction=0", "data.test_fraction=0.3", "partition.kind=iid", f"partition.num_clients={n}",
        "sampling.fraction=0.001", "evaluation.clients=10", "rounds=2", "train.steps=1", name="scale",
    )  # fmt: skip
    run_federated(cfg, progress=False)
    recs = [json.loads(x) for x in (Path(cfg.run_dir()) / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["client"] is None]
    watched = set(evaluation_clients([f"client_{i}" for i in range(n)], 10, cfg.seed))
    trained = {r["client"] for r in recs if r.get("sampled")}
    assert len(trained) <= 20 and [r["round"] for r in rounds] == [0, 1, 2]
    for rnd in (0, 1, 2):  # records only for the clients that did something that round
        active = {r["client"] for r in recs if r["client"] is not None and r["round"] == rnd}
        sampled = {r["client"] for r in recs if r["round"] == rnd and r.get("sampled")}
        assert active == watched | sampled and len(sampled) == (10 if rnd else 0)
    # shards were packed only for the clients that trained or were scored (each at most once:
    # the bounded cache holds them), never for the other ~9,980
    assert set(built) == watched | trained and len(built) == len(set(built))
    assert len(list((Path(cfg.run_dir()) / "clients").glob("**/*.pt"))) <= len(trained)  # state: trainers only


def test_a_thousand_peers_cost_only_the_peers_that_take_part(tiny_cfg, monkeypatch) -> None:
    """Gossip without a server over 1,000 registered peers, 10 a round: only the peers that trained
    or were scored had their data packed, only the trainers hold a state on disk, and the
    checkpoint holds no peer's model (the server-side simulation kept all of them, every round)."""
    from fedtune.report import io

    built: list[str] = []
    real = ClientShards._build_text

    def counted(self: ClientShards, cid: str):  # type: ignore[no-untyped-def]
        built.append(cid)
        return real(self, cid)

    monkeypatch.setattr(ClientShards, "_build_text", counted)
    n = 1_000
    cfg = tiny_cfg(
        "strategy.name=gossip", "strategy.topology=regular", "strategy.degree=4",
        "data.source=friends", "data.labels=null", "data.max_docs_per_label=null", "data.block_size=8",
        "data.val_fraction=0", "data.test_fraction=0.3", "partition.kind=iid", f"partition.num_clients={n}",
        "sampling.fraction=0.01", "evaluation.clients=10", "rounds=2", "train.steps=1", name="peers",
    )  # fmt: skip
    run_federated(cfg, progress=False)
    run_dir = Path(cfg.run_dir())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    watched = set(evaluation_clients([f"client_{i}" for i in range(n)], 10, cfg.seed))
    trained = {r["client"] for r in recs if r.get("sampled")}
    assert 10 < len(trained) <= 20
    assert all(r["gossip_messages"] >= 0 for r in recs if r["client"] is None and r["round"] > 0)
    assert set(built) == watched | trained and len(built) == len(set(built))  # never the other ~980
    assert {p.parent.name for p in (run_dir / "clients").glob("*/*.pt")} == trained  # state: trainers only
    assert sorted(io.load_checkpoint(run_dir / io.CHECKPOINT)) == ["init", "ledger", "round"]

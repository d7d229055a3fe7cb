"""A Byzantine peer (attack injection: its model carries Gaussian noise instead of its update) pulls
gossip's honest peers away from where they would be without it; under bristle_p2p the honest
peers' models stay near the clean run's. On the tiny (random-weight) model the loss barely
reacts to the adapter, so the loss-based trust alone lets noise through (measured, scale 5:
honest peers 76.5 from the clean run under bristle_p2p without `keep`, 84.0 under gossip); the
distance prioritiser (`keep: 1`, each ring peer scores only its nearest neighbour) stops it."""

import math

from fedtune.client.run import ClientState
from fedtune.client.store import ClientStateStore
from fedtune.engines.faults import attackers
from fedtune.recipes.federated import run_federated

PEERS = ("email", "http", "json", "logging")


def models(run_dir):
    store = ClientStateStore(run_dir / "clients", ClientState())
    return {c: store.get(c).peer.model() for c in PEERS}


def gap(a, b) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def test_one_attacking_peer_moves_gossip_but_not_bristle(tiny_cfg) -> None:
    over = ("rounds=2", "train.steps=2", "strategy.topology=ring")
    attack = ("attack.kind=gaussian", "attack.fraction=0.25", "attack.scale=5")
    clean = models(run_federated(tiny_cfg("strategy.name=gossip", *over, name="clean"), progress=False).run_dir)
    hit = models(run_federated(tiny_cfg("strategy.name=gossip", *over, *attack, name="hit"), progress=False).run_dir)
    cfg = tiny_cfg("strategy.name=bristle_p2p", "strategy.keep=1", *over, *attack, name="b")
    robust = run_federated(cfg, progress=False)
    kept = models(robust.run_dir)
    (bad,) = attackers(list(PEERS), 0.25, 0)
    honest = [c for c in PEERS if c != bad]
    pulled = max(gap(hit[c], clean[c]) for c in honest)
    stayed = max(gap(kept[c], clean[c]) for c in honest)
    assert pulled > 1.0  # the noise reached every honest peer under gossip
    assert stayed < 0.05 * pulled

"""Availability traces: each client is online in exactly its window of every cycle, the draw is
among the online clients, seeded; DP-FedAvg's accountant refuses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import config_from_dict
from fedtune.config.schema import AvailabilityConfig, SamplingConfig
from fedtune.errors import ConfigError
from fedtune.sampling import online_clients, sample_round

IDS = [f"c{i:03d}" for i in range(40)]


def test_diurnal_clients_are_online_for_their_window_of_every_cycle() -> None:
    a = AvailabilityConfig(kind="diurnal", period=6, online=0.5)
    rounds = {r: set(online_clients(IDS, a, 0, r)) for r in range(1, 13)}
    for c in IDS:
        on = [r for r in rounds if c in rounds[r]]
        assert len(on) == 6  # 3 of every 6 rounds, over two cycles
        assert on[3:] == [r + 6 for r in on[:3]]  # the same time of day in the next cycle
        residues = {r % 6 for r in on}
        assert any(residues == {(s + j) % 6 for j in range(3)} for s in range(6))  # consecutive, wrapping
    assert online_clients(IDS, a, 0, 5) == online_clients(IDS, a, 0, 5)  # seeded
    assert online_clients(IDS, a, 0, 5) != online_clients(IDS, a, 1, 5)
    assert online_clients(IDS, AvailabilityConfig(), 0, 5) == IDS


def test_the_round_draws_among_the_online_clients_only() -> None:
    s = SamplingConfig(fraction=0.25, availability=AvailabilityConfig(kind="diurnal", period=4, online=0.5))
    for r in range(1, 9):
        online = online_clients(IDS, s.availability, 7, r)
        picked = sample_round(IDS, s, 7, r)
        assert set(picked) <= set(online) and len(picked) == round(0.25 * len(online))


def test_dp_fedavg_refuses_an_availability_trace() -> None:
    raw = {
        "model": {"name": "tiny"},
        "strategy": {"name": "dp_fedavg"},
        "sampling": {"availability": {"kind": "diurnal"}},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    (p,) = e.value.problems
    assert str(p).startswith("sampling.availability.kind = 'diurnal'") and "fixed client sampling rate" in str(p)


def test_a_run_trains_exactly_the_online_clients(tiny_cfg) -> None:
    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("sampling.availability.kind=diurnal", "sampling.availability.period=2", "rounds=2")
    run_federated(cfg, progress=False)
    recs = [json.loads(x) for x in (Path(cfg.run_dir()) / "metrics.jsonl").read_text().splitlines()]
    ids = sorted({r["client"] for r in recs if r["client"]})
    for rnd in (1, 2):
        trained = sorted(r["client"] for r in recs if r["round"] == rnd and r["client"] and "train_loss" in r)
        assert trained == online_clients(ids, cfg.sampling.availability, cfg.seed, rnd)


@pytest.mark.parametrize("scheme", ["fixed", "poisson"])
def test_secure_sampling_is_secret_not_a_function_of_the_seed(scheme: str, monkeypatch) -> None:
    """With privacy.randomness 'secure' nobody holding the config can recompute who took part:
    no seeded generator is consulted, and the same (seed, round) gives different samples."""
    import fedtune.sampling as sampling

    s = SamplingConfig(fraction=0.25, scheme=scheme)
    seeded = [sample_round(IDS, s, 7, r) for r in range(1, 21)]
    monkeypatch.setattr(sampling, "numpy_rng", lambda *a: pytest.fail("a seeded draw in secure mode"))
    first = [sample_round(IDS, s, 7, r, "secure") for r in range(1, 21)]
    again = [sample_round(IDS, s, 7, r, "secure") for r in range(1, 21)]
    assert first != again and first != seeded
    if scheme == "fixed":
        assert all(len(p) == 10 and len(set(p)) == 10 and set(p) <= set(IDS) for p in first)
    else:  # each client in with probability 1/4: 200 expected inclusions over 20 rounds of 40
        assert 140 < sum(map(len, first)) < 260


def test_a_min_updates_no_round_can_meet_is_refused(tiny_cfg) -> None:
    """4 clients, min_updates 10: every round was skipped, the run ended 'complete' untrained."""
    from fedtune.errors import ConfigError
    from fedtune.recipes.federated import run_federated

    with pytest.raises(ConfigError, match="sampling.min_updates = 10: a round has at most 4 updates"):
        run_federated(tiny_cfg("sampling.min_updates=10", name="never"), progress=False)
    with pytest.raises(ConfigError, match="at most 2 updates"):
        run_federated(tiny_cfg("sampling.fraction=0.5", "sampling.min_updates=3", name="never2"), progress=False)

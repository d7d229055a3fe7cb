"""Communication budget: the run stops cleanly (checkpointed, exported, summarized) after the round
that spends it, and a resume does not go past it."""

import json

import pytest

from fedtune.recipes.federated import run_federated
from fedtune.report import io


def test_budget_stops_the_run_cleanly_and_resume_respects_it(tiny_cfg) -> None:
    probe = run_federated(tiny_cfg("rounds=1", name="probe"), progress=False)
    per_round = probe.records[-1]["cum_bytes"]  # bytes of one round (fixed for fedavg + identity)
    cfg = tiny_cfg("rounds=6", f"budget_mb={2.5 * per_round / 1e6}", name="budget")
    run = run_federated(cfg, progress=False)
    rounds = [r for r in run.records if r["client"] is None]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # round 3 crosses 2.5 rounds' worth
    assert rounds[-1]["cum_bytes"] == 3 * per_round and "budget_mb" in rounds[-1]["stopped"]
    assert all("test_ppl" in r for r in run.records if r["round"] == 3 and r["client"])  # evaluated at the stop
    summary = json.loads((run.run_dir / io.SUMMARY).read_text())
    assert summary["stopped"] == rounds[-1]["stopped"] and run.final_round == 3
    assert (run.run_dir / "adapters" / "global" / "adapter_model.safetensors").exists()

    again = run_federated(cfg, resume=True, progress=False)
    assert again.records == run.records  # nothing more to do


def test_injected_dropout_is_recorded_and_safari_fills_in(tiny_cfg) -> None:
    over = ("rounds=3", "train.steps=2", "sampling.dropout=0.4")
    avg = run_federated(tiny_cfg(*over, name="avg"), progress=False)
    failed = [r for r in avg.records if r.get("failure")]
    assert failed and all(r["failure"] == "no reply (injected dropout)" and r["bytes_down"] > 0 for r in failed)
    per_round = {r["round"]: r["failures"] for r in avg.records if r["client"] is None and r["round"] > 0}
    assert sum(per_round.values()) == len(failed)
    saf = run_federated(tiny_cfg(*over, "strategy.name=safari", name="saf"), progress=False)
    assert [r.get("failure") for r in saf.records] == [r.get("failure") for r in avg.records]  # same seeded faults
    used = [r["surrogates"] for r in saf.records if r["client"] is None and r.get("surrogates")]
    late = [r for r in failed if r["round"] > 1]  # a client heard from before and then lost
    assert bool(used) == bool(late)


def test_a_poisoned_update_is_rejected_and_recorded(tiny_cfg, monkeypatch) -> None:
    """A client whose update has NaNs (or the wrong shape) is a recorded failure; the round
    aggregates the others and the model stays finite."""
    import math

    import torch

    import fedtune.client.run as client_run

    real = client_run.client_round

    def broken(model, received, shard, *args, **kwargs):
        delta, metrics, private = real(model, received, shard, *args, **kwargs)
        if shard.client_id == "json":
            delta = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
        if shard.client_id == "http":
            delta = {k: v[..., :1] for k, v in delta.items()}
        return delta, metrics, private

    monkeypatch.setattr(client_run, "client_round", broken)
    run = run_federated(tiny_cfg("rounds=2", "train.steps=2", name="poison"), progress=False)
    by = {(r["round"], r["client"]): r for r in run.records}
    assert "NaN or Inf" in by[(1, "json")]["failure"] and "has shape" in by[(1, "http")]["failure"]
    assert by[(1, "json")]["bytes_up"] > 0 and by[(1, None)]["failures"] == 2
    assert all(math.isfinite(by[(2, c)]["test_ppl"]) for c in ("email", "json", "http", "logging"))


def test_sign_flip_attack_hurts_fedavg_and_a_robust_rule_resists(tiny_cfg) -> None:
    over = ("rounds=3", "train.steps=3", "data.labels=[email, json, http, logging, urllib]")
    clean = run_federated(tiny_cfg(*over, name="clean"), progress=False).records[-1]["mean_ppl"]
    attack = ("attack.kind=sign_flip", "attack.fraction=0.2", "attack.scale=4")
    hit = run_federated(tiny_cfg(*over, *attack, name="hit"), progress=False).records[-1]["mean_ppl"]
    robust = run_federated(
        tiny_cfg(*over, *attack, "strategy.name=robust", "strategy.rule=median", name="robust"), progress=False
    ).records[-1]["mean_ppl"]
    assert hit > clean * 1.02  # the attack does damage
    assert robust < hit and abs(robust / clean - 1) < 0.02
    from fedtune.engines.faults import attackers

    bad = attackers(["email", "http", "json", "logging", "urllib"], 0.2, 0)
    bristle = run_federated(tiny_cfg(*over, *attack, "strategy.name=bristle", name="bristle"), progress=False)
    # measured: clean 275.3, attacked FedAvg 312.6, Bristle 286.7 (median 279.6): in round 1 the
    # flipped factors still lower the reference loss (B starts at 0, so -4 dB (A0 - 4 dA) is not
    # a reversal) and get weight; once they hurt, they get none
    damage = bristle.records[-1]["mean_ppl"] - clean
    assert damage < 0.5 * (hit - clean)
    weights = [r["bristle_weights"] for r in bristle.records if r["client"] is None and r["round"] > 0]
    assert len(bad) == 1 and all(weights[-1][c] == 0 for c in bad)
    assert [r["attackers"] for r in bristle.records if "attackers" in r] == [sorted(bad)]  # round 0 names them
    assert all(sum(w.values()) == pytest.approx(1.0, abs=1e-5) for w in weights)


def test_secure_aggregation_gives_the_fedavg_result_from_masked_uploads(tiny_cfg, monkeypatch) -> None:
    import fedtune.strategies.fedavg as fedavg_mod

    seen = []
    real = fedavg_mod.fedavg_aggregate

    def spy(global_state, updates):
        seen.append([u.client_id for u in updates])
        return real(global_state, updates)

    monkeypatch.setattr(fedavg_mod, "fedavg_aggregate", spy)
    over = ("rounds=2", "train.steps=2")
    plain = run_federated(tiny_cfg(*over, name="plain"), progress=False).records
    seen.clear()
    masked = run_federated(tiny_cfg(*over, "secure_aggregation=true", name="masked"), progress=False).records
    assert seen == [["secure-sum"], ["secure-sum"]]  # the strategy never saw a single client's update
    for p, m in zip(plain, masked):
        if "test_ppl" in p:
            assert abs(m["test_ppl"] / p["test_ppl"] - 1) < 1e-4  # fixed point, 24 fractional bits
        if p["client"] and p["round"] > 0:
            assert m["bytes_up"] > 1.9 * p["bytes_up"] - 1000  # int64 uploads: twice the fp32 bytes


def test_dp_fedavg_under_secure_aggregation_clips_on_clients_and_equals_the_clear_run(tiny_cfg, monkeypatch) -> None:
    """Distributed-noise DP-FedAvg: with secure aggregation each client clips and adds its noise
    share before masking; the server sees one masked sum and ends with the same model as the
    run that clips and noises in the clear (same seeded noise, fixed-point error only)."""
    pytest.importorskip("dp_accounting")
    from fedtune.strategies.dp import DPFedAvg, norm

    seen, sent = [], []
    real_agg, real_tr = DPFedAvg.aggregate, DPFedAvg.client_transform

    def spy_agg(self, rnd, updates, state, peers=None):
        seen.append([u.client_id for u in updates])
        return real_agg(self, rnd, updates, state, peers)

    def spy_tr(self, delta, state, rnd, cid, n):
        out = real_tr(self, delta, state, rnd, cid, n)
        sent.append((norm(delta), state["clip"]))
        return out

    monkeypatch.setattr(DPFedAvg, "aggregate", spy_agg)
    monkeypatch.setattr(DPFedAvg, "client_transform", spy_tr)
    over = (
        "rounds=2",
        "train.steps=2",
        "strategy.name=dp_fedavg",
        "strategy.noise=distributed",
        "strategy.noise_multiplier=0.5",
        "strategy.clip=0.01",
    )
    clear = run_federated(tiny_cfg(*over, name="clear"), progress=False).records
    assert all(ids != ["secure-sum"] for ids in seen) and not sent
    seen.clear()
    masked = run_federated(tiny_cfg(*over, "secure_aggregation=true", name="masked"), progress=False).records
    assert seen == [["secure-sum"], ["secure-sum"]]
    assert len(sent) == 8 and any(n > clip for n, clip in sent)  # the clip binds on the clients
    for c, m in zip(clear, masked):
        if "test_ppl" in c:
            assert abs(m["test_ppl"] / c["test_ppl"] - 1) < 1e-4
        if c["client"] is None and c["round"] > 0:
            assert m["epsilon"] == c["epsilon"]


def test_stragglers_past_the_deadline_are_recorded_and_min_updates_holds_the_model(tiny_cfg) -> None:
    """Seeded stragglers: those slower than the deadline are failures (no upload), those within
    it are aggregated; the round lasts until the deadline when someone missed it; with too few
    replies (sampling.min_updates) the global model is kept."""
    from fedtune.engines.faults import Faults

    over = ("rounds=3", "train.steps=1", "sampling.straggler_fraction=0.6", "sampling.straggler_slowdown=5")
    run = run_federated(tiny_cfg(*over, "sampling.deadline=2.5", name="late"), progress=False)
    faults = Faults(straggler_fraction=0.6, straggler_slowdown=5.0, deadline=2.5)
    clients = [r for r in run.records if r["client"] and r["round"] > 0]
    want_late = {(r["round"], r["client"]) for r in clients if faults.sim_time(0, r["round"], r["client"]) > 2.5}
    got_late = {(r["round"], r["client"]) for r in clients if "deadline" in r.get("failure", "")}
    assert got_late == want_late and 0 < len(got_late) < len(clients)
    assert all(r.get("bytes_up", 0) == 0 for r in clients if (r["round"], r["client"]) in got_late)
    slow_ok = [r for r in clients if "sim_time" in r and r["sim_time"] > 1.0]
    assert slow_ok and all(r["sim_time"] <= 2.5 for r in slow_ok)  # stragglers that made it count
    for s in (r for r in run.records if r["client"] is None and r["round"] > 0):
        missed = any(rnd == s["round"] for rnd, _ in got_late)
        assert s["sim_round_time"] == (
            2.5
            if missed
            else max(r.get("sim_time", 1.0) for r in clients if r["round"] == s["round"] and "sim_time" in r)
        )

    strict = run_federated(
        tiny_cfg(*over, "sampling.deadline=2.5", "sampling.min_updates=4", name="strict"), progress=False
    )
    rounds = [r for r in strict.records if r["client"] is None]
    for prev, s in zip(rounds, rounds[1:]):
        if "skipped" in s:  # nothing aggregated: every client's global test ppl is unchanged
            assert s["mean_ppl"] == pytest.approx(prev["mean_ppl"], rel=1e-9)
    assert any("skipped" in s for s in rounds)


@pytest.mark.parametrize("trust", ["val", "predictions"])
def test_pcl_client_records_carry_the_scoring_traffic(tiny_cfg, trust: str) -> None:
    """PCL's peer scoring moves the peers' adapters down ('val') or each client's top-k predictions
    up and the reference set down ('predictions'): the client records held only the adapter's own
    payloads (5 % of the run's bytes for 'predictions'). Now a round's client records sum to its
    summary, less the reference set's collection, which is no one client's upload."""
    run = run_federated(
        tiny_cfg("strategy.name=pcl", f"strategy.trust={trust}", "rounds=2", name=trust), progress=False
    )
    for rnd in (1, 2):
        summary = next(r for r in run.records if r["client"] is None and r["round"] == rnd)
        mine = [r for r in run.records if r["client"] is not None and r["round"] == rnd]
        assert len(mine) == 4 and all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in mine)
        assert sum(r["bytes_down"] for r in mine) == summary["bytes_down"]
        collected = summary["bytes_up"] - sum(r["bytes_up"] for r in mine)
        assert collected == 0 if trust == "val" or rnd == 2 else collected > 0

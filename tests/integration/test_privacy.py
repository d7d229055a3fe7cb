"""Sample-level DP-SGD end to end: every client's epsilon is the accountant's value for its
steps, target epsilon stops the run, and a resumed run reports the uninterrupted epsilon."""

import pytest

from fedtune.recipes.federated import run_federated

pytest.importorskip("dp_accounting", reason="needs the dp extra (make test installs it)")


def test_dp_sgd_epsilon_per_client_resume_and_target(tiny_cfg, interrupt_after, no_time) -> None:
    from fedtune.strategies.dp import epsilon

    over = ("rounds=3", "train.steps=2", "train.dp_sgd.noise_multiplier=1.0", "train.dp_sgd.clip=0.5")
    full = run_federated(tiny_cfg(*over, name="full"), progress=False)
    for r in full.records:
        if r["client"] is not None and r["round"] > 0:
            # each client's rate q = batch_size / its own training blocks; 2 steps per round
            assert r["sample_epsilon"] == pytest.approx(epsilon(r["dp_rate"], 1.0, 2 * r["round"], 1e-5), rel=1e-12)
    rounds = [r for r in full.records if r["client"] is None and r["round"] > 0]
    # the clients' training loss is outside the DP guarantee: not sent by default, and the record says so
    round0 = next(r for r in full.records if r["round"] == 0 and r["client"] is None)
    assert round0["client_metrics"].startswith("withheld")
    assert not any("train_loss" in r or "train_last_loss" in r for r in full.records)
    worst = [max(r["sample_epsilon"] for r in full.records if r["round"] == k and r["client"]) for k in (1, 2, 3)]
    assert [r["sample_epsilon"] for r in rounds] == worst and worst[0] < worst[1] < worst[2]

    cfg = tiny_cfg(*over, name="cut")
    interrupt_after(cfg, 1)
    resumed = run_federated(cfg, resume=True, progress=False)
    assert no_time(resumed.records) == no_time(full.records)

    # a target between round 2's and round 3's worst epsilon: stop after round 2, evaluated
    target = (worst[1] + worst[2]) / 2
    opt_in = ("privacy.release_client_metrics=true", f"train.dp_sgd.target_epsilon={target}")
    stop = run_federated(tiny_cfg(*over, *opt_in, name="stop"), progress=False)
    last = stop.records[-1]
    assert next(r for r in stop.records if r["client"] is None)["client_metrics"] == "released"
    assert "train_loss" in last
    assert last["round"] == 2 and "target_epsilon" in last["stopped"] and last["sample_epsilon"] <= target
    assert last["mean_ppl"] == pytest.approx(rounds[1]["mean_ppl"], rel=1e-9)


def test_dp_sgd_is_refused_where_it_does_not_apply(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="train.dp_sgd"):
        tiny_cfg("train.dp_sgd.clip=1.0", "strategy.name=fedkseed")
    # every adapter with a group on its own schedule (plain steps outside DP-SGD), by its declared
    # param_groups: S'MoRE's routers ran outside DP-SGD under a full epsilon before
    for kind in ("moe_lora", "smore"):
        for strategy in ("comigs", "fedavg"):
            with pytest.raises(ConfigError, match="adapter.router_every"):
                tiny_cfg(
                    "train.dp_sgd.clip=1.0",
                    f"adapter.kind={kind}",
                    "adapter.router_every=1",
                    f"strategy.name={strategy}",
                )
        tiny_cfg("train.dp_sgd.clip=1.0", f"adapter.kind={kind}", "adapter.router_every=0", "strategy.name=comigs")


def test_a_poisson_round_that_draws_nobody_still_releases_noise_and_counts(tiny_cfg) -> None:
    """DP-FedAvg under Poisson sampling at q = 0.25 over 4 clients: seed 0 draws nobody in round 2.
    That round now aggregates noise alone and the accountant counts it (it was skipped, the model
    kept, and round 2's epsilon missing: 5.27 reported over 6 rounds where 5 were counted)."""
    pytest.importorskip("dp_accounting", reason="needs the dp extra")
    from fedtune.errors import ConfigError
    from fedtune.strategies.dp import epsilon

    over = ("strategy.name=dp_fedavg", "strategy.clip=0.1", "sampling.scheme=poisson", "sampling.fraction=0.25")
    run = run_federated(tiny_cfg(*over, "rounds=2", "train.steps=2"), progress=False)
    summary = {r["round"]: r for r in run.records if r["client"] is None}
    sampled = {r["round"]: r["sampled"] for r in run.records if r["client"] is not None and r["sampled"]}
    assert 1 in sampled and 2 not in sampled and "skipped" not in summary[2]  # nobody drawn, still a round
    assert summary[2]["epsilon"] == pytest.approx(epsilon(0.25, 1.0, 2, 1e-5), rel=1e-9)
    assert summary[2]["mean_ppl"] != summary[1]["mean_ppl"]  # the noise moved the model
    with pytest.raises(ConfigError, match="sampling.min_updates"):
        tiny_cfg(*over, "sampling.min_updates=2")


def test_dp_sgd_counts_the_steps_of_a_rejected_upload(tiny_cfg) -> None:
    """An upload the server decoded and then rejected (here: over sampling.max_update_mb) came from
    DP-SGD steps the accountant must count: each client's epsilon equals that of the same run with
    every upload accepted (same rates and steps). It was 0 before, the round record too."""
    over = ("rounds=2", "train.steps=2", "train.dp_sgd.noise_multiplier=1.0", "train.dp_sgd.clip=0.5")
    clean = run_federated(tiny_cfg(*over, name="clean"), progress=False).records
    rejected = run_federated(tiny_cfg(*over, "sampling.max_update_mb=0.001", name="rejected"), progress=False).records
    for rnd in (1, 2):
        got = {r["client"]: r for r in rejected if r["round"] == rnd and r["client"] is not None}
        want = {r["client"]: r["sample_epsilon"] for r in clean if r["round"] == rnd and r["client"] is not None}
        assert all(r["failure"].startswith("rejected") for r in got.values())
        assert {c: r["sample_epsilon"] for c, r in got.items()} == pytest.approx(want, rel=1e-12)
        summary = next(r for r in rejected if r["round"] == rnd and r["client"] is None)
        assert (
            summary["sample_epsilon"] == pytest.approx(max(want.values()), rel=1e-12) and summary["sample_epsilon"] > 0
        )

"""The same experiment on Flower's simulation runtime gives the same numbers as in-process."""

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (make test installs it)")

from fedtune.errors import ConfigError  # noqa: E402
from fedtune.recipes.federated import run_federated  # noqa: E402

pytestmark = pytest.mark.flower

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def test_fedtune_run_honours_engine_flower_sim(tiny_cfg, tmp_path, no_time, cli) -> None:
    """`fedtune run --set engine.name=flower-sim` runs on Flower's simulation runtime (the
    landed CLI ignored engine.name and ran in-process): the records are those of an in-process
    run, and Flower's own client processes did the training (their client-state folders)."""
    import json

    over = ["strategy.name=flora", "rounds=2", "train.steps=2", "adapter.ranks=[2, 4, 4, 8]"]
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    d = tmp_path / "sim"
    sets = [x for o in [*over, f"output_dir={d}", "engine.name=flower-sim"] for x in ("--set", o)]
    r = cli("run", TINY, "--no-progress", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    sim = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert no_time(sim) == no_time(local.records)  # losses, ppl, bytes: identical
    assert (d / "adapters" / "global" / "adapter_model.safetensors").exists()
    token = (d / ".run-token").read_text()
    assert sorted(p.name for p in (d / "clients" / token).iterdir()) == ["email", "http", "json", "logging"]
    assert not (local.run_dir / "clients" / token).exists()


def test_comigs_and_error_feedback_on_flower_keep_client_state_and_match_inprocess(tiny_cfg, no_time) -> None:
    """Client state on the SuperNodes' own disk: CoMiGS's specialists and routers, and top-k's
    error-feedback residual, carried between rounds by each client; the same numbers as in-process."""
    from fedtune.recipes.flower import run_simulation

    over = [
        "adapter.kind=moe_lora",
        "strategy.name=comigs",
        "codec.name=topk",
        "codec.fraction=0.2",
        "downlink_codec.name=identity",
        "rounds=3",
        "train.steps=2",
    ]
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    sim = run_simulation(tiny_cfg(*over, name="sim"), num_clients=4)
    assert no_time(sim.records) == no_time(local.records)
    last = [r for r in sim.records if r["round"] == 3 and r["client"]]
    assert all("personal_ppl" in r for r in last)


@pytest.mark.parametrize("kind", ["dora", "smore"])
def test_dora_and_smore_on_flower_match_inprocess(tiny_cfg, no_time, kind) -> None:
    """Adapter kinds beyond LoRA on Flower's simulation: DoRA (PEFT's layers, magnitude vectors
    travel) and S'MoRE (its own routed residual tree): the same records as in-process."""
    from fedtune.recipes.flower import run_simulation

    over = [f"adapter.kind={kind}", "rounds=2", "train.steps=2"]
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    sim = run_simulation(tiny_cfg(*over, name="sim"), num_clients=4)
    assert no_time(sim.records) == no_time(local.records)
    assert next(r for r in sim.records if r["round"] == 0 and r["client"] is None)["adapter"] == kind


def test_trust_distill_on_flower_keeps_each_party_model_on_its_node_and_matches_inprocess(tiny_cfg, no_time) -> None:
    """trust_distill on Flower: each party's own model (two depths and a random one) lives on its
    SuperNode, only predictions and pseudo-labels travel; the records (losses, trust, bytes of
    the payloads) are the in-process run's, and the server's checkpoint holds no party's weights."""
    import torch

    from fedtune.recipes.flower import run_simulation

    over = [
        "strategy.name=trust_distill",
        'strategy.parties=[{}, {"layers": 1}, {"init": "random"}]',
        "strategy.public_blocks=2",
        "data.labels=[email, json, http]",
        "rounds=2",
        "train.steps=2",
        "train.lr=0.02",
    ]
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    sim = run_simulation(tiny_cfg(*over, name="sim"), num_clients=3)
    assert no_time(sim.records) == no_time(local.records)
    last = [r for r in sim.records if r["round"] == 2 and r["client"]]
    assert len(last) == 3 and all(r["bytes_up"] > 0 and r["trust"] and "test_ppl" in r for r in last)
    assert torch.load(sim.run_dir / "checkpoint.pt", weights_only=False)["parties"] == {}
    token = (sim.run_dir / ".run-token").read_text()
    kept = sorted(
        p.relative_to(sim.run_dir / "clients" / token).as_posix()
        for p in (sim.run_dir / "clients" / token).rglob("*.pt")
    )
    assert kept == [
        "email/round-1.pt",
        "email/round-2.pt",
        "http/round-1.pt",
        "http/round-2.pt",
        "json/round-1.pt",
        "json/round-2.pt",
    ]


def test_secaggplus_on_flower_with_dp_matches_inprocess_secure_aggregation(tiny_cfg) -> None:
    """DP-FedAvg (clip on the client, distributed noise) under Flower's SecAgg+: the server sees
    only the unmasked mean, and the run ends where the in-process pairwise-masked run ends (both
    quantize: 24 fractional bits in-process, SecAgg+'s ~2e-8 steps on Flower). The noise is made
    negligible here because on Flower each share is sized for SecAgg+'s reconstruction threshold
    (2 of 4 clients, so any accepted set of survivors carries sigma * S), in-process for the 4
    known participants; the clients' noise_parties are checked instead."""
    pytest.importorskip("dp_accounting")
    from fedtune.recipes.flower import run_simulation

    over = [
        "rounds=2",
        "train.steps=2",
        "secure_aggregation=true",
        "strategy.name=dp_fedavg",
        "strategy.noise=distributed",
        "strategy.noise_multiplier=1e-6",
        "strategy.clip=0.01",
    ]
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    sim = run_simulation(tiny_cfg(*over, name="sim"), num_clients=4)
    for a, b in zip(local.records, sim.records):
        assert a["round"] == b["round"] and a["client"] == b["client"]
        if "test_ppl" in a:
            assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-4)
        if a["client"] is None and a["round"] > 0:
            assert b["epsilon"] == a["epsilon"] and b["failures"] == 0
        if a["client"] and a["round"] > 0:  # SecAgg+ moves keys and shares besides the masked vector
            assert b["bytes_up"] > 0 and "failure" not in b
    from fedtune.recipes.flower import check_flower

    with pytest.raises(ConfigError, match="codec.name"):  # an uplink codec: refused on every engine
        tiny_cfg(*over, "codec.name=fp16", "engine.name=flower-sim")
    with pytest.raises(ConfigError, match="SecAgg\\+ quantizes"):  # a downlink codec: on Flower
        check_flower(tiny_cfg(*over, "downlink_codec.name=fp16", "engine.name=flower-sim"))


def test_secaggplus_noise_shares_are_sized_for_the_reconstruction_threshold() -> None:
    """Each client's distributed-noise share is N(0, (sigma S)^2 / t) with t = SecAgg+'s
    threshold (2 of 4 here), so the noise of any set of survivors SecAgg+ accepts is >= sigma S
    (the landed code sized it for all 4 sampled clients: sigma S / 2 each)."""
    import torch

    from fedtune.client.run import ClientJob, ClientState
    from fedtune.engines.flower.secagg_plus import threshold
    from fedtune.engines.plan import StrategyTransform
    from fedtune.strategies.dp import DPFedAvg

    assert threshold(4) == 2 and threshold(10) == 5 and threshold(2) == 2
    dp = DPFedAvg(noise="distributed", noise_multiplier=1.5, clip=0.2)
    job = ClientJob(1, "a", b"", ("a", "b", "c", "d"), {"clip": 0.2, "noise_parties": threshold(4)})
    share = StrategyTransform(dp)({"k": torch.zeros(300, 300)}, job, None, ClientState())["k"]
    assert float(share.std()) == pytest.approx(1.5 * 0.2 / 2**0.5, rel=0.02)
    t = len(job.participants) - 2  # two clients lost: the survivors' shares still sum to >= sigma S
    assert t * (1.5 * 0.2 / 2**0.5) ** 2 >= (1.5 * 0.2) ** 2 - 1e-12


def test_flower_refuses_what_it_cannot_run(tiny_cfg) -> None:
    from fedtune.recipes.flower import check_flower

    with pytest.raises(ConfigError, match="pools raw data"):
        check_flower(tiny_cfg("strategy.name=centralized", "engine.name=flower-sim"))
    with pytest.raises(ConfigError, match="from public data"):
        check_flower(tiny_cfg("strategy.name=fedsb", "adapter.kind=lora_sb", "engine.name=flower-sim"))
    with pytest.raises(ConfigError, match="scores models on clients' data"):
        check_flower(tiny_cfg("strategy.name=pcl", "strategy.trust=val", "engine.name=flower-sim"))
    with pytest.raises(ConfigError, match="pools every client's test data"):
        check_flower(tiny_cfg("evaluation.ood=true", "engine.name=flower-sim"))
    with pytest.raises(ConfigError, match="sampling.deadline"):
        check_flower(tiny_cfg("sampling.deadline=2", "engine.name=flower-deploy"), "flower-deploy")


def test_validate_reports_what_flower_cannot_run(cli) -> None:
    """`fedtune validate` runs the engine checks (the landed code ran them only inside a Flower run)."""
    r = cli("validate", TINY, "--set", "engine.name=flower-sim", "--set", "strategy.name=centralized")
    assert r.returncode == 2 and "pools raw data" in r.stderr and "Traceback" not in r.stderr


def flower_processes(work) -> list[tuple[int, str]]:
    """Live Flower processes of the deployment in `work` (FLWR_HOME under it), as (pid, command):
    other Flower runs on the machine do not count. Full command lines (psutil), never cut."""
    import psutil

    names = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
    names += ("fedtune.engines.flower.warm",)  # a SuperNode's zygote and the ClientApps it forked
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE or not any(n in cmd for n in names):
                continue
            if p.environ().get("FLWR_HOME", "").startswith(str(work)):
                out.append((p.info["pid"], cmd))
        except psutil.Error:
            continue
    return out


def test_deployment_tls_auth_and_serverapp_restart(tiny_cfg, tmp_path, no_time, monkeypatch) -> None:
    """SuperLink + 2 SuperNodes as separate processes with TLS and SuperNode authentication: an
    unregistered node is refused; the ServerApp is killed after round 1 and a new `flwr run`
    continues from the checkpoint; the numbers equal an uninterrupted in-process run; nothing is
    left running afterwards. Each node's zygote set the node up for the app before serving: no
    ClientApp message paid a set-up phase (tokenizer, data, model, plan)."""
    import json
    import os
    import signal
    from pathlib import Path

    from fedtune.engines.flower_deploy import LocalDeployment, write_app
    from fedtune.engines.flower_keys import make_node_keys

    # evaluated before round 1 and after the last (each message is a fresh ClientApp process)
    over = ["data.labels=[email, json]", "rounds=2", "train.steps=2", "evaluation.every=2"]
    # a deployment draws its sample from the OS CSPRNG (randomness auto -> secure); the reference
    # does too, so the round-0 record names the same source (every client is sampled either way)
    local = run_federated(tiny_cfg(*over, "privacy.randomness=secure", name="inproc"), progress=False)
    cfg = tiny_cfg(*over, name="deployed")
    run_dir = Path(cfg.run_dir()).resolve()
    app = write_app(cfg.model_copy(update={"output_dir": str(run_dir)}), tmp_path / "app", 2)
    monkeypatch.setenv("FEDTUNE_PROFILE", str(tmp_path / "profile.jsonl"))  # inherited by every process
    with LocalDeployment(tmp_path / "work", 2, tls=True, auth=True, port=9492, node_port=9500, app=app) as dep:
        dep.start_superlink()
        dep.wait_for_superlink()
        for i in range(2):
            dep.register_supernode(i)
            dep.start_supernode(i)
        ((intruder_key, _),) = make_node_keys(tmp_path / "intruder", 1)
        dep.start_supernode(2, key=intruder_key)  # a third node whose key was never registered
        intruder = dep.procs["supernode-2"]
        run = dep.submit_async(app)
        wait_for_round(run_dir, 1)
        round1 = [x for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"round": 1' in x]
        assert round1
        serverapps = [pid for pid, cmd in flower_processes(tmp_path / "work") if "flwr-serverapp" in cmd]
        assert serverapps, flower_processes(tmp_path / "work")
        for pid in serverapps:
            os.kill(pid, signal.SIGKILL)  # the ServerApp dies mid-run
        run.wait(timeout=300)
        assert not (run_dir / "summary.json").exists()
        assert intruder.wait(timeout=120) != 0  # refused by the SuperLink
        assert "Failed to activate SuperNode" in (tmp_path / "work" / "supernode-2.log").read_text()
        again = dep.submit(app, timeout=900)  # a new ServerApp resumes from the checkpoint
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(x in lines for x in round1)  # round 1 kept as written (wall times too): resumed, not rerun
    assert no_time([json.loads(x) for x in lines]) == no_time(local.records)
    assert flower_processes(tmp_path / "work") == []
    for i in range(2):
        log = (tmp_path / "work" / f"supernode-{i}.log").read_text()
        assert "set up ahead in" in log
        assert "the SuperNode loop's sleeps capped at 0.25 s" in log
    prof = [json.loads(x) for x in (tmp_path / "profile.jsonl").read_text().splitlines()]
    handled = [p for p in prof if p["side"] == "client"]
    assert {p["kind"] for p in handled} >= {"train", "evaluate"}
    assert [p["setup"] for p in handled] == [{}] * len(handled)


def wait_for_round(run_dir, rnd: int, timeout: float = 900) -> None:
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.exists():
            recs = [json.loads(x) for x in f.read_text().splitlines()]
            if any(r["client"] is None and r["round"] >= rnd for r in recs):
                return
        time.sleep(0.2)
    raise TimeoutError(f"round {rnd} did not finish within {timeout} s")


def test_killed_supernode_is_a_recorded_failure_and_rejoins(tiny_cfg, tmp_path) -> None:
    import json
    from pathlib import Path

    from fedtune.engines.flower_deploy import LocalDeployment, write_app

    # evaluated only before round 1 and after the last (an evaluation of the dead node would wait out
    # the timeout a second time); the SuperNode of 'json' crashes (SIGKILL: the SuperLink is not told)
    # after round 1 and is restarted at once: round 2 waits out engine.timeout for it (time for the new
    # node to register; a graceful stop would unregister it and the rounds would race the restart),
    # round 3 (the last) finds the restarted node by its new node id
    over = ["data.labels=[email, json]", "rounds=3", "train.steps=2", "engine.timeout=45", "evaluation.every=3"]
    cfg = tiny_cfg(*over, name="fault")
    run_dir = Path(cfg.run_dir()).resolve()
    app = write_app(cfg.model_copy(update={"output_dir": str(run_dir)}), tmp_path / "app", 2)
    with LocalDeployment(tmp_path / "work", 2, tls=False, port=9292, node_port=9400, app=app) as dep:
        dep.start_superlink()
        dep.wait_for_superlink()
        dep.start_supernode(0)
        dep.start_supernode(1)
        run = dep.submit_async(app)
        wait_for_round(run_dir, 1)
        dep.crash_supernode(1)  # client 'json' (partition 1) dies after round 1
        dep.start_supernode(1)  # and comes back
        assert run.wait(timeout=900) == 0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {r["round"]: r for r in recs if r["client"] is None}
    json2 = next(r for r in recs if r["round"] == 2 and r["client"] == "json")
    assert "failure" in json2 and summary[2]["failures"] == 1
    email2 = next(r for r in recs if r["round"] == 2 and r["client"] == "email")
    assert email2["bytes_up"] > 0  # the round completed with the rest
    rejoined = [r for r in recs if r["round"] > 2 and r["client"] == "json" and r.get("bytes_up", 0) > 0]
    assert rejoined, "the restarted SuperNode did not rejoin"
    assert (run_dir / "summary.json").exists()
    assert flower_processes(tmp_path / "work") == []


def test_fault_and_attack_injection_wrap_the_flower_simulation_too(tiny_cfg, no_time) -> None:
    """Dropouts (a wrapper around any engine) and sign-flip attackers (a client-side update
    transform) give the same records on Flower's simulation as in-process."""
    from fedtune.recipes.flower import run_simulation

    over = ["rounds=2", "train.steps=2", "sampling.dropout=0.3", "attack.kind=sign_flip", "attack.fraction=0.25"]
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    sim = run_simulation(tiny_cfg(*over, name="sim"), num_clients=4)
    assert no_time(sim.records) == no_time(local.records)
    assert any("injected dropout" in r.get("failure", "") for r in sim.records)

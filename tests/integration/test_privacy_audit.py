"""One-run privacy audit end to end on the tiny model (Steinke, Nasr, Jagielski 2023,
arXiv:2305.08846): without DP the canary client's memorization gives a clearly positive lower
bound; under strong DP-SGD noise the lower bound stays below the accountant's epsilon."""

import json
from pathlib import Path

import pytest

from fedtune.recipes.federated import run_federated

pytest.importorskip("dp_accounting", reason="needs the dp extra (DP-SGD's accountant, scipy for the bound)")

# 64 canaries of one 64-token block each in one client whose own data is capped at 4 blocks, so
# canaries are most of what it trains on. Two clients (the audit scores the global model; a third
# and fourth client would only dilute the canary client's update and double the test's time).
CANARIES = (
    "data.labels=[email, json]",
    "data.dedup=false",
    "data.max_train_blocks=4",
    "train.batch_size=8",
    "train.lr=0.03",
    "audit.canaries=64",
    "audit.seed=1",
)


def test_audit_without_dp_finds_the_canaries(tiny_cfg) -> None:
    from typer.testing import CliRunner

    from fedtune.cli import app
    from fedtune.recipes.audit import audit_run

    cfg = tiny_cfg(*CANARIES, "train.steps=40", name="open")
    run_federated(cfg, progress=False)
    res = audit_run(Path(cfg.run_dir()))
    # measured: 1.99 (32 of 32 guesses right at r = 32; 59 of 64 at r = 64 gives 1.50); the most
    # 64 canaries can show at 95 % (Bonferroni over 3 guess counts, delta 1e-5) is 2.71
    assert res["epsilon_lower"] > 1.0
    assert res["mean_score_in"] < res["mean_score_out"] < 0.05
    assert res["accountant"] == [] and res["delta"] == 1e-5
    assert json.loads((Path(cfg.run_dir()) / "audit.json").read_text())["epsilon_lower"] == res["epsilon_lower"]
    metrics = (Path(cfg.run_dir()) / "metrics.jsonl").read_text()
    assert "included" not in metrics and "canar" not in metrics  # the secret stays in audit/canaries.json

    r = CliRunner().invoke(app, ["audit", cfg.run_dir()])
    assert r.exit_code == 0, r.output
    assert "audit (lower)" in r.output and f"{res['epsilon_lower']:.3g}" in r.output


def test_audit_of_strong_dp_sgd_stays_below_the_accountant(tiny_cfg) -> None:
    from fedtune.recipes.audit import audit_run

    noisy = ("train.dp_sgd.noise_multiplier=5", "train.dp_sgd.clip=0.5")
    cfg = tiny_cfg(*CANARIES, "train.steps=20", *noisy, name="dp")
    run_federated(cfg, progress=False)
    res = audit_run(Path(cfg.run_dir()))
    (dp,) = res["accountant"]
    assert dp["mechanism"] == "dp_sgd" and dp["delta"] == res["delta"] == 1e-5
    assert 0 < dp["epsilon"] < 5  # measured: 1.07 for the canary client, lower bound 0.0
    assert res["epsilon_lower"] <= dp["epsilon"] and dp["epsilon_lower"] <= dp["canary_epsilon"]
    assert dp["lower_le_upper"]

"""train.client_lr: a client trains with its own local learning rate; the others with train.lr."""

import pytest

from fedtune.errors import ConfigError
from fedtune.recipes.federated import run_federated


def round1_losses(cfg) -> dict[str, float]:
    recs = run_federated(cfg, progress=False).records
    return {r["client"]: r["train_loss"] for r in recs if r["round"] == 1 and r["client"]}


def test_each_client_trains_with_its_own_lr(tiny_cfg) -> None:
    short = ("rounds=1", "train.steps=2", "evaluation.every=1")
    slow = round1_losses(tiny_cfg(*short, "train.lr=0.001", name="slow"))
    fast = round1_losses(tiny_cfg(*short, "train.lr=0.05", name="fast"))
    mixed = round1_losses(tiny_cfg(*short, "train.lr=0.001", "train.client_lr={email: 0.05}", name="mixed"))
    assert mixed["email"] == fast["email"] != slow["email"]  # round 1 starts from the same global model
    assert all(mixed[c] == slow[c] != fast[c] for c in ("http", "json", "logging"))


def test_an_unknown_client_is_refused_before_training(tiny_cfg, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train.client_lr .*no client mail.*use client ids: email, http"):
        run_federated(tiny_cfg("train.client_lr={mail: 0.01}", name="bad"), progress=False)
    assert not (tmp_path / "bad").exists()

"""FedMM end to end on the tiny model (configs/fedmm_tiny.yaml): two labelled parties, one
unlabelled shifted party; the duals live in the clients' state on disk, the discriminator in the
server's checkpoint, and a resumed run equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT


def fedmm_cfg(tmp_path, *more: str):  # type: ignore[no-untyped-def]
    from fedtune.config import load_config

    over = [
        "rounds=2",
        "train.steps=2",
        "data.max_train_blocks=8",
        "data.max_test_blocks=4",
        "evaluation.generate=0",
        "evaluation.max_examples=4",
        f"output_dir={tmp_path}/{{name}}",
    ]
    return load_config(ROOT / "configs" / "fedmm_tiny.yaml", [*over, *more])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    from fedtune.recipes.federated import run_federated

    return run_federated(fedmm_cfg(tmp_path_factory.mktemp("fedmm") / "full"), progress=False)


def test_fedmm_keeps_duals_on_clients_and_the_discriminator_on_the_server(full_run) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.store import ClientStateStore
    from fedtune.report import io
    from fedtune.strategies.fedmm_client import DISC, DUAL

    recs = full_run.records
    target = [r for r in recs if r["round"] == 2 and r["client"] == "target"][0]
    source = [r for r in recs if r["round"] == 2 and r["client"] == "source-0"][0]
    assert "train_loss" not in target and "train_loss" in source  # the unlabelled party has no LM loss
    assert target["dual_norm"] > 0 and "global_acc" in target  # target accuracy is measured every round
    summary = [r for r in recs if r["round"] == 2 and r["client"] is None][0]
    assert summary["parties_unlabelled"] == 1 and summary["parties_labelled"] == 2
    store = ClientStateStore(full_run.run_dir / "clients", None)  # type: ignore[arg-type]
    duals = store.get("target").private
    assert duals and all(k.startswith(DUAL) for k in duals)
    ckpt = io.load_checkpoint(full_run.run_dir / io.CHECKPOINT)
    assert all(k.startswith(DISC) for k in ckpt["strategy_state"]["disc"])
    assert not any(k.startswith(DISC) for k in ckpt["global"])


def test_fedmm_resume_equals_the_uninterrupted_run(full_run, tmp_path, interrupt_after, no_time) -> None:  # type: ignore[no-untyped-def]
    from fedtune.recipes.federated import run_federated
    from fedtune.report import io

    cut = fedmm_cfg(tmp_path / "cut")
    interrupt_after(cut, 1)
    resumed = run_federated(cut, resume=True, progress=False)

    assert no_time(resumed.records) == no_time(full_run.records)
    a, b = (io.load_checkpoint(r.run_dir / io.CHECKPOINT)["strategy_state"] for r in (full_run, resumed))
    assert all(torch.equal(a["global"][k], b["global"][k]) for k in a["global"])
    assert all(torch.equal(a["disc"][k], b["disc"][k]) for k in a["disc"])

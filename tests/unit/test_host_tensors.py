"""No tensor is left on the host: the in-process engine's warm-up, client rounds (plain, FedProx,
DP-SGD), evaluation, PCL's reference logits and FedKSeed's perturbations run with the model on a
device that torch considers different from the CPU (`strict_device.py`: torch's Python PrivateUse1
backend, computing on the CPU), where an op mixing a model tensor with a host tensor of more than 0
dims raises CUDA's "Expected all tensors to be on the same device". Each path's numbers equal the
same path run on the CPU, so the strict device changes nothing but where tensors are said to be.

Each of these failed before the fix of issue #26 (on a GPU, and here): the warm-up fed a host
block to the model, `reference_logits` fed the host reference blocks, FedKSeed added host
perturbations to the parameters in place.

Limits: fp32 only (the strict device has no autocast, so a bf16-only path is not covered); only the
paths these tests run are checked (Flower's client app, generation on instruction data and
LoRA-SB's initialisation are not run here); a host tensor that never meets a model tensor (the
CPU copies that codecs, aggregation and payloads work on, by design) is not an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from conftest import ROOT
from fedtune.client.run import ClientJob
from fedtune.client.train import TrainSpec, model_device
from fedtune.codecs import deserialize
from fedtune.models.adapters import get_state
from fedtune.seeding import torch_generator
from fedtune.strategies.base import RunContext
from fedtune.strategies.fedkseed import SCALARS, FedKSeed
from strict_device import strict_backend, strict_device

# Registered when this module is collected, before any test of the session runs a backward pass:
# autograd sizes its per-device queues at the first backward of a process, and a device type
# registered later has none ("device_ready_queues_" assertion in engine.cpp).
strict_backend()


def tiny_config(out: Any, *overrides: str) -> Any:
    from fedtune.config import load_config

    pinned = ["model.device=cpu", "model.dtype=float32", "train.bf16=false", "train.steps=2"]
    return load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={out}", *pinned, *overrides])


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedtune.engines.inprocess import inprocess_federation

    return inprocess_federation(tiny_config(tmp_path_factory.mktemp("host") / "run"))


@contextlib.contextmanager
def on_strict_device(model: Any) -> Iterator[torch.device]:
    """The model on the strict device while inside (back on the CPU after)."""
    with strict_device() as dev:
        model.to(dev)
        try:
            assert model_device(model) == dev
            yield dev
        finally:
            model.to("cpu")


@pytest.fixture(scope="module")
def init(fed: Any) -> Any:
    """The initial adapter (host copies)."""
    return get_state(fed.model)


def client_round(fed: Any, init: Any, **spec: Any) -> list[Any]:
    """Round 1 of two clients from the initial adapter (train spec fields changed by `spec`)."""
    engine, ids = fed.engine, fed.client_ids[:2]
    sent = fed.strategy.configure(1, ids, fed.strategy.init_state(init))
    codec = engine.plan.down_codec
    jobs = [ClientJob(1, c, codec.encode(sent[c], None, torch_generator(0, "down", c))[0], tuple(ids)) for c in ids]
    plan = engine.plan
    engine.plan = replace(plan, spec=replace(plan.spec, **spec))
    try:
        return list(engine.run(jobs))
    finally:
        engine.plan = plan


def test_the_strict_device_computes_like_the_cpu_and_refuses_host_tensors() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    want = layer(x)
    with on_strict_device(layer) as dev:
        got = layer(x.to(dev))
        assert got.device == dev
        torch.testing.assert_close(got.to("cpu"), want, rtol=0, atol=0)
        scaled = got * torch.tensor(2.0)  # a 0-dim host tensor mixes, as on CUDA
        picked = got[torch.tensor([1, 0])]  # host indices, as on CUDA
        assert scaled.device == dev and picked.device == dev
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            layer(x)


def test_the_warm_up_runs_on_the_models_device(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.engines import federation
    from fedtune.engines.inprocess import inprocess_federation

    with strict_device() as dev:
        monkeypatch.setattr(federation, "resolve_device", lambda name: dev)
        built = inprocess_federation(tiny_config(tmp_path / "run"))
    assert model_device(built.model) == dev and built.round0["device"] == "strict:0"


@pytest.mark.parametrize(
    "spec", [{}, {"prox_mu": 0.1}, {"dp_noise": 1.0, "dp_clip": 1.0}], ids=["plain", "fedprox", "dp_sgd"]
)
def test_a_client_round_runs_on_the_models_device(fed: Any, init: Any, spec: dict[str, Any]) -> None:
    want = client_round(fed, init, **spec)
    with on_strict_device(fed.model):
        got = client_round(fed, init, **spec)
    for a, b in zip(want, got):
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-5)
        da, db = deserialize(a.payload), deserialize(b.payload)
        assert da.keys() == db.keys()
        for k in da:
            torch.testing.assert_close(db[k], da[k], rtol=1e-4, atol=1e-7, msg=k)


def test_evaluation_and_peer_scoring_run_on_the_models_device(fed: Any, init: Any) -> None:
    engine, ids = fed.engine, fed.client_ids[:2]
    states = {c: init for c in ids}

    def score() -> tuple[Any, ...]:
        return (
            engine.evaluate(states),
            engine.peer_evaluate(states, max_blocks=2),
            engine.reference_losses({"g": init}, 2),
            engine.reference_logits(states, engine.reference_blocks(2), 4),
        )

    want = score()
    with on_strict_device(fed.model):
        got = score()
    for c in ids:
        assert got[0][c]["loss"] == pytest.approx(want[0][c]["loss"], rel=1e-5)
        assert got[1][c] == pytest.approx(want[1][c], rel=1e-5)
        vals, idx = got[3][c]
        assert vals.device.type == "cpu" and idx.device.type == "cpu"  # the server's side gets host tensors
        torch.testing.assert_close(vals, want[3][c][0], rtol=1e-4, atol=1e-5)
    assert got[2]["g"] == pytest.approx(want[2]["g"], rel=1e-5)


@pytest.mark.parametrize("full", [False, True], ids=["adapter", "full"])
def test_fedkseed_perturbs_the_weights_on_their_device(tiny_with_lora: Any, random_shard: Any, full: bool) -> None:
    ks = FedKSeed(num_seeds=8, eps=1e-3, lr=0.05, full=full, ctx=RunContext(seed=7))
    spec = TrainSpec(steps=2, batch_size=2)

    def train(model: Any, w0: Any) -> tuple[torch.Tensor, float]:
        sent = ks.configure(1, ["a"], ks.init_state(w0))["a"]
        payload, metrics, _ = ks.client_train(model, sent, w0, random_shard("a"), spec, 7, 1)
        return payload[SCALARS], metrics["train_loss"]

    model, w0 = tiny_with_lora()
    want, want_loss = train(model, w0)
    model, w0 = tiny_with_lora()
    with on_strict_device(model):
        got, loss = train(model, w0)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    # each scalar is a loss difference over 2 eps: last-bit differences of the kernels show up x 500
    torch.testing.assert_close(got, want, rtol=0, atol=500 * 4e-6)


@pytest.mark.parametrize("kind", ["moe_lora", "lora_sb"])
def test_adapters_injected_into_a_model_on_its_device_live_there(kind: str) -> None:
    """`load_moe_adapter` (and LoRA-SB's gradient-estimate init) on a model already moved to its
    device: the new tensors are drawn on the host as before (same values), then join the layer."""
    from fedtune.adapters.lora_sb import inject_lora_sb_
    from fedtune.adapters.moe_lora import inject_moe_lora_
    from fedtune.config.schema import ModelConfig
    from fedtune.models.load import load_model, tiny_dir

    mcfg = ModelConfig(name="tiny", dtype="float32")
    x = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))

    def build() -> Any:
        model = load_model(str(tiny_dir(mcfg, 0)), mcfg)
        if kind == "moe_lora":
            return inject_moe_lora_(model, num_experts=2, r=2, alpha=4.0, seed=3)
        return inject_lora_sb_(model, ["q_proj", "v_proj"], 2, x, 0.1)

    reference = build()
    with torch.no_grad():
        want = reference(input_ids=x).logits
    model = load_model(str(tiny_dir(mcfg, 0)), mcfg)
    with strict_device() as dev:
        model.to(dev)
        if kind == "moe_lora":
            inject_moe_lora_(model, num_experts=2, r=2, alpha=4.0, seed=3)
        else:
            inject_lora_sb_(model, ["q_proj", "v_proj"], 2, x, 0.1)
        assert {p.device for p in model.parameters()} == {dev}
        with torch.no_grad():
            got = model(input_ids=x.to(dev)).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

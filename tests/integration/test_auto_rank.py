"""adapter.auto (FedPipe-style): each client's LoRA rank and upload bits from its declared memory
and upload budget, the choice in the round-0 record, and uploads of exactly the predicted size."""

import pytest

from fedtune.errors import ConfigError
from fedtune.models.auto_rank import Workload, memory_bytes, model_shape, upload_bytes
from fedtune.recipes.federated import run_federated

SHORT = ("rounds=1", "train.steps=2", "strategy.name=hetlora")
WORK = Workload(batch=4, seq=64, weight_dtype="float32", bf16=False, optimizer="adamw", checkpointing=False)


@pytest.fixture(scope="module")
def shape():
    from fedtune.config.schema import ModelConfig
    from fedtune.models.load import tiny_dir

    return model_shape(str(tiny_dir(ModelConfig(name="tiny"), 0)), ["q_proj", "v_proj"])


def test_the_shape_counts_match_the_model_and_peft(shape) -> None:
    """The estimate's parameter counts: the base's from the loaded model, the adapter's from
    PEFT's injected LoRA at two ranks (references: torch and PEFT, not the formula)."""
    from fedtune.config.schema import LoraAdapterConfig, ModelConfig
    from fedtune.models.adapters import inject_, lora_config
    from fedtune.models.load import load_model, tiny_dir

    mcfg = ModelConfig(name="tiny")
    base = load_model(str(tiny_dir(mcfg, 0)), mcfg)
    assert shape.n_base == sum(p.numel() for p in base.parameters())
    for r in (2, 8):
        model = inject_(load_model(str(tiny_dir(mcfg, 0)), mcfg), lora_config(LoraAdapterConfig(r=r), "llama"), 0)
        assert shape.adapter_parameters(r) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the adapter term of the memory estimate: fp32 weight + grad + AdamW's two moments per parameter
    assert memory_bytes(shape, 8, WORK) - memory_bytes(shape, 2, WORK) == 16 * (
        shape.adapter_parameters(8) - shape.adapter_parameters(2)
    )


def test_each_client_gets_the_largest_rank_and_bits_that_fit(tiny_cfg, shape) -> None:
    gb = {r: memory_bytes(shape, r, WORK) / 1e9 for r in (2, 4, 8)}
    mb = {(r, b): upload_bytes(shape, r, b) / 1e6 for r in (2, 8) for b in (32, 16, 8)}
    memory = {"email": (gb[2] + gb[4]) / 2, "http": 1.0, "json": 1.0, "logging": 1.0}  # email: rank 2 only
    budget = {"email": 1.0, "http": (mb[(8, 8)] + mb[(8, 16)]) / 2, "json": 1.0, "logging": 1.0}  # http: 8 bits
    auto = f"adapter.auto={{per_client_memory_gb: {memory}, budget_mb: {budget}, ranks: [2, 4, 8], bits: [32, 16, 8]}}"
    recs = run_federated(tiny_cfg(*SHORT, auto.replace("'", ""), name="auto"), progress=False).records
    picks = next(r for r in recs if r["round"] == 0 and r["client"] is None)["adapter_auto"]
    assert {c: (p["rank"], p["bits"]) for c, p in picks.items()} == {
        "email": (2, 32), "http": (8, 8), "json": (8, 32), "logging": (8, 32)
    }  # fmt: skip
    up = {r["client"]: r["bytes_up"] for r in recs if r["round"] == 1 and r.get("client")}
    assert up == {c: round(p["upload_mb"] * 1e6) for c, p in picks.items()}  # the real payloads' sizes
    assert up["http"] < up["json"] / 2  # 8-bit codes (+ scales per block, key names) against fp32
    assert up["email"] == round(mb[(2, 32)] * 1e6)


def test_refusals_name_the_field_before_training(tiny_cfg, tmp_path, shape) -> None:
    with pytest.raises(ConfigError, match=r"adapter.auto.*needs one rank for all clients"):
        tiny_cfg("adapter.auto={per_client_memory_gb: 1}", name="fedavg")  # fedavg: one rank
    with pytest.raises(ConfigError, match=r"drop adapter.ranks, or drop adapter.auto"):
        tiny_cfg(*SHORT, "adapter.auto={per_client_memory_gb: 1}", "adapter.ranks=[2, 2, 2, 2]", name="both")
    with pytest.raises(ConfigError, match=r"adapter.auto = .*not an option of adapter.kind 'lora_sb'"):
        tiny_cfg(*SHORT, "adapter.kind=lora_sb", "adapter.auto={per_client_memory_gb: 1}", name="sb")
    too_small = memory_bytes(shape, 2, WORK) / 1e9 / 2
    cfg = tiny_cfg(*SHORT, f"adapter.auto={{per_client_memory_gb: {too_small}, ranks: [2, 4]}}", name="small")
    with pytest.raises(ConfigError, match=r"\[email\].*no candidate fits: rank 2 needs an estimated"):
        run_federated(cfg, progress=False)
    cfg = tiny_cfg(*SHORT, "adapter.auto={per_client_memory_gb: {email: 1, mail: 1}}", name="ids")
    with pytest.raises(ConfigError, match=r"no client mail"):
        run_federated(cfg, progress=False)
    assert not any((tmp_path / n).exists() for n in ("small", "ids"))

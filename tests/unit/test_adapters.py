import pytest
import torch

from fedtune.config.schema import AdapterConfig, ModelConfig, TinyModelConfig
from fedtune.models.adapters import export_peft, get_state, inject_, lora_config, set_state_
from fedtune.models.load import load_model, model_type, tiny_dir


@pytest.mark.parametrize("arch,targets", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})])
def test_export_loads_with_peft_and_gives_the_same_logits(tmp_path, arch: str, targets: set[str]) -> None:
    from peft import PeftModel

    mcfg = ModelConfig(name="tiny", tiny=TinyModelConfig(arch=arch))
    d = str(tiny_dir(mcfg, seed=0))
    cfg = lora_config(AdapterConfig(r=4, alpha=8), model_type(d))
    assert set(cfg.target_modules) == targets  # detected per architecture (GPT-2: Conv1D c_attn)
    model = inject_(load_model(d, mcfg), cfg, seed=1)
    state = get_state(model)
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    set_state_(model, trained)
    ids = torch.randint(0, 250, (2, 16), generator=g)
    with torch.no_grad():
        ours = model(input_ids=ids).logits

    out = export_peft(trained, cfg, d, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(d, mcfg), str(out))
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_adapter_init_is_seeded_and_b_starts_at_zero() -> None:
    mcfg = ModelConfig(name="tiny")
    d = str(tiny_dir(mcfg, seed=0))
    cfg = lora_config(AdapterConfig(r=4), model_type(d))
    a = get_state(inject_(load_model(d, mcfg), cfg, seed=5))
    b = get_state(inject_(load_model(d, mcfg), cfg, seed=5))
    c = get_state(inject_(load_model(d, mcfg), cfg, seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
    assert all(torch.count_nonzero(a[k]) == 0 for k in a if "lora_B" in k)


def test_exported_adapter_files_follow_the_umask(tmp_path) -> None:
    """A team shares run folders: exported adapters (PEFT and mixture) are readable as the umask
    says, like every other run file. safetensors' own save_file made them owner-only (0600)."""
    import os
    import stat

    from fedtune.adapters.moe_lora import save_moe_adapter

    mcfg = ModelConfig(name="tiny")
    d = str(tiny_dir(mcfg, seed=0))
    cfg = lora_config(AdapterConfig(r=2), model_type(d))
    state = get_state(inject_(load_model(d, mcfg), cfg, seed=0))
    old = os.umask(0o022)
    try:
        peft_dir = export_peft(state, cfg, d, tmp_path / "peft")
        moe_dir = save_moe_adapter({"x": torch.ones(2)}, {"num_experts": 2}, tmp_path / "moe")
    finally:
        os.umask(old)
    for f in (peft_dir / "adapter_model.safetensors", moe_dir / "moe_adapter.safetensors", moe_dir / "moe_config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f

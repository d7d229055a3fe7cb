import pytest
import torch

from fedtune.adapters.lora_sb import SB_A, SB_B, SB_R, LoraSBLinear, inject_lora_sb_, sb_to_lora
from fedtune.codecs import serialize
from fedtune.config.schema import ModelConfig, TinyModelConfig
from fedtune.models.adapters import get_state, select_trainable_, set_state_
from fedtune.models.load import load_model, tiny_dir
from fedtune.strategies.base import STRATEGIES
from fedtune.types import ClientUpdate


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_lora_sb_forward_is_base_plus_brA_and_only_r_trains(arch: str, targets: list[str]) -> None:
    mcfg = ModelConfig(name="tiny", tiny=TinyModelConfig(arch=arch))
    model = load_model(str(tiny_dir(mcfg, 0)), mcfg)
    blocks = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=blocks).logits
    inject_lora_sb_(model, targets, r=4, init_blocks=blocks, init_lr=0.0)
    with torch.no_grad():
        same = model(input_ids=blocks).logits  # R_0 = 0 (init_lr 0): the base model
    torch.testing.assert_close(same, before)
    state = get_state(model)
    layer = next(m for m in model.modules() if isinstance(m, LoraSBLinear))
    x = torch.randn(3, layer.lora_sb_A.shape[1])
    r = torch.randn(4, 4)
    with torch.no_grad():
        layer.lora_sb_R.copy_(r)
        expected = layer.base_layer(x) + x @ (layer.lora_sb_B @ r @ layer.lora_sb_A).T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # B and A come from the SVD of the gradient: orthonormal columns / rows
    b = layer.lora_sb_B
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-4, rtol=0)
    params = select_trainable_(model, state)
    assert all(p.shape == (4, 4) for p in params) and len(params) == sum(k.endswith(SB_R) for k in state)


def test_fedsb_is_exact_and_moves_4r2_bytes_per_module() -> None:
    g = torch.Generator().manual_seed(1)
    mods = ["m.0.q_proj", "m.1.v_proj"]
    r, d, k = 3, 20, 16
    glob = {}
    for m in mods:
        glob[m + SB_A] = torch.randn(r, k, generator=g)
        glob[m + SB_B] = torch.randn(d, r, generator=g)
        glob[m + SB_R] = torch.randn(r, r, generator=g)
    strat = STRATEGIES.get("fedsb")()
    state = strat.init_state(glob)
    sent = strat.configure(1, ["c0", "c1"], state)["c0"]
    assert sorted(sent) == sorted(m + SB_R for m in mods)
    assert 4 * r * r * len(mods) < len(serialize(sent)) < 4 * r * r * len(mods) + 512
    rs = [{m + SB_R: torch.randn(r, r, generator=g) for m in mods} for _ in range(2)]
    ups = [
        ClientUpdate(f"c{i}", {kk: v - glob[kk] for kk, v in ri.items()}, n)
        for i, (ri, n) in enumerate(zip(rs, [1, 3]))
    ]
    res = strat.aggregate(1, ups, state)
    new, _ = res.global_state, res.state
    for m in mods:
        dw = new[m + SB_B] @ new[m + SB_R] @ new[m + SB_A]
        exact = sum(p * glob[m + SB_B] @ ri[m + SB_R] @ glob[m + SB_A] for p, ri in zip([0.25, 0.75], rs))
        torch.testing.assert_close(dw, exact, rtol=1e-5, atol=1e-5)
    lora = sb_to_lora(new)
    for m in mods:
        torch.testing.assert_close(
            lora[m + ".lora_B.weight"] @ lora[m + ".lora_A.weight"],
            new[m + SB_B] @ new[m + SB_R] @ new[m + SB_A],
            rtol=1e-5,
            atol=1e-5,
        )


def test_fedsb_needs_the_lora_sb_adapter() -> None:
    from fedtune.config import config_from_dict
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="needs adapter.kind 'lora_sb'"):
        config_from_dict({"strategy": {"name": "fedsb"}})


def test_set_state_round_trips_lora_sb() -> None:
    mcfg = ModelConfig(name="tiny")
    model = load_model(str(tiny_dir(mcfg, 0)), mcfg)
    blocks = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    inject_lora_sb_(model, ["q_proj"], r=2, init_blocks=blocks, init_lr=0.1)
    st = get_state(model)
    changed = {k: v + 1 for k, v in st.items()}
    set_state_(model, changed)
    assert all(torch.equal(get_state(model)[k], changed[k]) for k in st)

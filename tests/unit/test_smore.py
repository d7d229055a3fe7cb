"""S'MoRE (arXiv:2504.06426): a 2-level tree of residuals with a fixed router against a hand
computation, the parameter count, the start at the base model, CoMiGS's presets on its keys,
the exact strategies refusing it by name, export / load."""

import math

import pytest
import torch
from torch import nn

from fedtune.adapters import build_adapter
from fedtune.adapters.base import InjectContext
from fedtune.adapters.smore import load_smore_adapter, smore_param_count
from fedtune.adapters.smore_layers import SMoRELinear
from fedtune.config.adapters import LoraAdapterConfig, MoELoraAdapterConfig, RMLoraAdapterConfig, SMoREAdapterConfig
from fedtune.config.schema import ModelConfig
from fedtune.models.adapters import adapter_parameters, get_state, set_state_
from fedtune.models.load import load_model, tiny_dir


def tiny(options):
    mcfg = ModelConfig(name="tiny")
    adapter = build_adapter(options)
    return adapter, adapter.inject(load_model(str(tiny_dir(mcfg, 0)), mcfg), InjectContext(seed=0, model_type="llama"))


def hand_tree(fanout: int) -> SMoRELinear:
    """2 orders, 2 experts each, rank 1, width 1, gate width 1, over a zero 1x1 base layer."""
    base = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(base.weight)
    layer = SMoRELinear(base, r=1, levels=2, experts=2, fanout=fanout, hidden=1, gate_dim=1, activation="tanh")
    values = {
        "smore_router_down": [[1.0]],  # u = x
        "smore_router_gate_l2": [[1.0], [0.0]],  # root logits (u, 0)
        "smore_router_key_l2": [[1.0], [-1.0]],
        "smore_router_gate_l1": [[0.0, 1.0], [0.0, -1.0]],  # under parent p: (key_p, -key_p)
        "smore_A_l1.0": [[1.0]],
        "smore_B_l1.0": [[0.5]],  # leaf 0: 0.5 x
        "smore_A_l1.1": [[2.0]],
        "smore_B_l1.1": [[-1.0]],  # leaf 1: -2 x
        "smore_A_l2.0": [[1.0]],
        "smore_B_l2.0": [[1.0]],  # order-2 residual 0: x
        "smore_A_l2.1": [[-1.0]],
        "smore_B_l2.1": [[0.5]],  # order-2 residual 1: -0.5 x
        "smore_W_l2.0": [[2.0]],
        "smore_W_out.0": [[3.0]],
    }
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(torch.tensor(v))
    return layer


def softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def test_a_two_order_tree_with_a_fixed_router_matches_the_hand_computation() -> None:
    x = 0.5
    # dense (fanout 2): root weights softmax(u, 0); parent 0 weighs its children softmax(1, -1), parent 1 softmax(-1, 1)
    w2 = softmax2(x, 0.0)
    leaves = (math.tanh(0.5 * x), math.tanh(-2.0 * x))
    c0 = sum(w * e for w, e in zip(softmax2(1.0, -1.0), leaves))
    c1 = sum(w * e for w, e in zip(softmax2(-1.0, 1.0), leaves))
    h = w2[0] * math.tanh(x + 2.0 * c0) + w2[1] * math.tanh(-0.5 * x + 2.0 * c1)
    out = hand_tree(2)(torch.tensor([[[x]]])).detach()
    assert float(out) == pytest.approx(3.0 * h, rel=1e-6)
    # fanout 1: one path; x > 0 takes residual 0 then leaf 0, x < 0 residual 1 then leaf 1
    sparse = hand_tree(1).requires_grad_(False)
    assert float(sparse(torch.tensor([[x]]))) == pytest.approx(3.0 * math.tanh(x + 2.0 * math.tanh(0.5 * x)))
    assert float(sparse(torch.tensor([[-x]]))) == pytest.approx(3.0 * math.tanh(0.25 + 2.0 * math.tanh(1.0)))


def test_the_parameter_count_is_the_formula_and_each_kind_s_budget_is_reported() -> None:
    counts = {}
    for options in (
        LoraAdapterConfig(r=2),
        RMLoraAdapterConfig(r=2),
        MoELoraAdapterConfig(r=2),
        SMoREAdapterConfig(r=1, levels=2, experts=2, hidden=2, gate_dim=4),
    ):
        adapter, model = tiny(options)
        params = adapter_parameters(model)
        counts[options.kind] = sum(p.numel() for p in params.values())
    print("trainable parameters (tiny llama, q and v):", counts)
    o = SMoREAdapterConfig(r=1, levels=2, experts=2, hidden=2, gate_dim=4)
    mcfg = ModelConfig(name="tiny")
    base = load_model(str(tiny_dir(mcfg, 0)), mcfg)
    layers = [m for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert counts["smore"] == sum(smore_param_count(m.in_features, m.out_features, o) for m in layers)
    assert counts["rm_lora"] == counts["lora"]


def test_the_adapter_starts_at_the_base_model_and_its_state_round_trips() -> None:
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    mcfg = ModelConfig(name="tiny")
    plain = load_model(str(tiny_dir(mcfg, 0)), mcfg)(input_ids=ids).logits
    _, model = tiny(SMoREAdapterConfig())
    torch.testing.assert_close(model(input_ids=ids).logits, plain)  # W_out = 0
    state = get_state(model)
    moved = {k: v + 0.01 for k, v in state.items()}
    set_state_(model, moved)
    assert all(torch.equal(get_state(model)[k], moved[k]) for k in state)
    assert not torch.allclose(model(input_ids=ids).logits, plain)


@pytest.mark.parametrize(("preset", "shared_experts"), [("1G1S", {0}), ("2G", {0, 1}), ("2S", set())])
def test_comigs_presets_share_generalist_residuals_and_keep_routers_private(preset: str, shared_experts: set) -> None:
    from fedtune.adapters.moe_lora import expert_index
    from fedtune.strategies import STRATEGIES

    _, model = tiny(SMoREAdapterConfig(experts=2))
    state = get_state(model)
    private = STRATEGIES.get("comigs")(preset=preset).private_keys(state)
    shared = set(state) - private
    assert all(".smore_router_" in k for k in state if expert_index(k) is None)  # only routers carry no index
    assert {expert_index(k) for k in shared} <= shared_experts
    assert all(".smore_router_" not in k for k in shared)
    for k in state:  # every residual of a shared index, at every order, and the structure with expert 0
        if expert_index(k) in shared_experts:
            assert k in shared, k
    assert any(".smore_W_out." in k for k in shared) == bool(shared_experts)


def private_key(key: str) -> str:
    """A shared-layout key in the private layout: the structure loses its expert index."""
    return key[: -len(".0")] if ".smore_W_" in key else key


def test_a_private_structure_is_the_same_tree_kept_on_the_client_under_comigs() -> None:
    """adapter.share_structure=false: W_l and W_out carry no expert index, so CoMiGS 1G1S keeps them
    on the client with the routers and specialists; the values (seeded init) and the model's output
    are those of the shared layout, only the keys differ."""
    from fedtune.strategies import STRATEGIES

    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    _, shared_model = tiny(SMoREAdapterConfig(experts=2))
    _, own_model = tiny(SMoREAdapterConfig(experts=2, share_structure=False))
    shared, own = get_state(shared_model), get_state(own_model)
    assert {private_key(k): v for k, v in shared.items()}.keys() == own.keys()
    assert all(torch.equal(own[private_key(k)], v) for k, v in shared.items())  # the same seeded init
    moved = {k: v + 0.01 * (i + 1) for i, (k, v) in enumerate(sorted(shared.items()))}
    set_state_(shared_model, moved)
    set_state_(own_model, {private_key(k): v for k, v in moved.items()})
    torch.testing.assert_close(own_model(input_ids=ids).logits, shared_model(input_ids=ids).logits)
    comigs = STRATEGIES.get("comigs")(preset="1G1S")
    sent = set(own) - comigs.private_keys(own)
    assert sent and not any(".smore_W_" in k for k in sent)  # every W_l and W_out stays on the client
    assert sent == {k for k in shared if k not in comigs.private_keys(shared) and ".smore_W_" not in k}


EXACT = [
    ("flora", {}),
    ("fedex_lora", {}),
    ("flexlora", {}),
    ("hetlora", {}),
    ("ffa_lora", {}),
    ("lora_fair", {}),
    ("robust", {"space": "dw"}),
    ("dp_fedavg", {"inner": "ffa_lora"}),
]


@pytest.mark.parametrize("strategy,params", EXACT, ids=[s for s, _ in EXACT])
def test_each_exact_strategy_refuses_smore_by_name(strategy: str, params: dict) -> None:
    from fedtune.config import config_from_dict
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict({"adapter": {"kind": "smore"}, "strategy": {"name": strategy, **params}})
    (p,) = [p for p in err.value.problems if p.field == "adapter.kind"]
    assert p.value == "smore" and "'smore' updates are a routed mixture" in p.constraint and "s * B @ A" in p.constraint


@pytest.mark.parametrize("strategy", ["fedavg", "comigs", "local"])
def test_fedavg_family_and_comigs_take_smore(strategy: str) -> None:
    from fedtune.config import config_from_dict

    assert config_from_dict({"adapter": {"kind": "smore"}, "strategy": {"name": strategy}}).adapter.kind == "smore"


@pytest.mark.parametrize("share_structure", [True, False])
def test_export_and_load_give_the_same_logits(tmp_path, share_structure: bool) -> None:
    adapter, model = tiny(SMoREAdapterConfig(levels=2, experts=3, fanout=2, share_structure=share_structure))
    set_state_(model, {k: v + 0.02 * torch.randn_like(v) for k, v in get_state(model).items()})
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(1))
    out = adapter.export(model, get_state(model), tmp_path / "a", "tiny", None, None)
    mcfg = ModelConfig(name="tiny")
    loaded = load_smore_adapter(load_model(str(tiny_dir(mcfg, 0)), mcfg), out)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

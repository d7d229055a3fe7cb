"""PEFT's methods beyond LoRA (DoRA, VeRA, IA3, LoHa, LoKr) on the adapter contract: each
method's defining formula on a small hand-computed case, VeRA's shared seeded matrices, the
trainable-parameter count, the algebra each strategy checks, and the PEFT export round trip."""

import math

import pytest
import torch
from torch import nn

from fedtune.adapters import build_adapter
from fedtune.adapters.base import InjectContext, adapter_of
from fedtune.config.adapters import (
    DoraAdapterConfig,
    IA3AdapterConfig,
    LoHaAdapterConfig,
    LoKrAdapterConfig,
    VeraAdapterConfig,
)
from fedtune.config.schema import ModelConfig, TinyModelConfig
from fedtune.models.adapters import get_state, set_state_, trainable_parameter_count
from fedtune.models.load import load_model, model_type, tiny_dir

KINDS = ["dora", "vera", "ia3", "loha", "lokr"]


class Toy(nn.Module):
    """Linear layers with given weights [out, in] (no bias), named as targets."""

    def __init__(self, **weights: list[list[float]]) -> None:
        super().__init__()
        for name, w in weights.items():
            t = torch.tensor(w)
            layer = nn.Linear(t.shape[1], t.shape[0], bias=False)
            layer.weight.data = t
            setattr(self, name, layer)


def injected(options, model: nn.Module, seed: int = 0) -> nn.Module:
    return build_adapter(options).inject(model, InjectContext(seed=seed, model_type="toy"))


def run(model: nn.Module, name: str, x: list[float]) -> list[float]:
    with torch.no_grad():
        return getattr(model, name)(torch.tensor([x])).squeeze(0).tolist()


def test_dora_output_is_the_magnitude_times_the_row_normalised_weight() -> None:
    """W = [[3, 4], [0, 1]], s = 1, B A = [[0, 0], [1, 0]]: V = W + B A = [[3, 4], [1, 1]], row
    norms (5, sqrt 2); m = (10, 2 sqrt 2) gives W' = [[6, 8], [2, 2]], so x = (1, 1) -> (14, 4)."""
    model = injected(DoraAdapterConfig(r=1, alpha=1.0, target_modules=["proj"]), Toy(proj=[[3.0, 4.0], [0.0, 1.0]]))
    init = get_state(model)
    assert sorted(init) == ["proj.lora_A.weight", "proj.lora_B.weight", "proj.lora_magnitude_vector"]
    torch.testing.assert_close(init["proj.lora_magnitude_vector"], torch.tensor([5.0, 1.0]))  # m_0 = ||W||_row
    assert run(model, "proj", [1.0, 1.0]) == pytest.approx([7.0, 1.0])  # B = 0: W' = W
    set_state_(
        model,
        {
            "proj.lora_A.weight": torch.tensor([[1.0, 0.0]]),
            "proj.lora_B.weight": torch.tensor([[0.0], [1.0]]),
            "proj.lora_magnitude_vector": torch.tensor([10.0, 2 * math.sqrt(2.0)]),
        },
    )
    assert run(model, "proj", [1.0, 1.0]) == pytest.approx([14.0, 4.0], abs=1e-5)


def test_ia3_scales_the_output_of_attention_targets_and_the_input_of_feed_forward_ones() -> None:
    """W = [[1, 2], [3, 4]], l = (2, 3), x = (1, 1): k: l * (W x) = (6, 21); down: W (l * x) = (8, 18)."""
    w = [[1.0, 2.0], [3.0, 4.0]]
    options = IA3AdapterConfig(target_modules=["k", "down"], feedforward_modules=["down"])
    model = injected(options, Toy(k=w, down=w))
    assert run(model, "k", [1.0, 1.0]) == pytest.approx([3.0, 7.0])  # l starts at 1
    set_state_(model, {"k.ia3_l": torch.tensor([[2.0], [3.0]]), "down.ia3_l": torch.tensor([[2.0, 3.0]])})
    assert run(model, "k", [1.0, 1.0]) == pytest.approx([6.0, 21.0])
    assert run(model, "down", [1.0, 1.0]) == pytest.approx([8.0, 18.0])


def test_loha_adds_the_hadamard_product_of_two_low_rank_products() -> None:
    """r = alpha = 1, W = 0: (B1 A1) = [[3, 4], [6, 8]], (B2 A2) = [[1, 0], [1, 0]], product
    [[3, 0], [6, 0]]: x = (1, 1) -> (3, 6)."""
    model = injected(LoHaAdapterConfig(r=1, alpha=1.0, target_modules=["proj"]), Toy(proj=[[0.0, 0.0], [0.0, 0.0]]))
    assert run(model, "proj", [1.0, 1.0]) == pytest.approx([0.0, 0.0])  # dW = 0 at init
    state = {
        "proj.hada_w1_a": torch.tensor([[1.0], [2.0]]),
        "proj.hada_w1_b": torch.tensor([[3.0, 4.0]]),
        "proj.hada_w2_a": torch.tensor([[1.0], [1.0]]),
        "proj.hada_w2_b": torch.tensor([[1.0, 0.0]]),
    }
    set_state_(model, state)
    assert run(model, "proj", [1.0, 1.0]) == pytest.approx([3.0, 6.0])


def test_lokr_adds_the_scaled_kronecker_product() -> None:
    """alpha / r = 4 / 2, W = 0 [4, 4]: W1 = [[1, 0], [0, 2]], W2 = [[1, 1], [0, 1]],
    kron = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 2, 2], [0, 0, 0, 2]]: x = 1 -> 2 * (2, 1, 4, 2)."""
    model = injected(LoKrAdapterConfig(r=2, alpha=4.0, target_modules=["proj"]), Toy(proj=[[0.0] * 4] * 4))
    assert sorted(get_state(model)) == ["proj.lokr_w1", "proj.lokr_w2"]  # r >= half of each factor: full W1, W2
    w1, w2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    set_state_(model, {"proj.lokr_w1": w1, "proj.lokr_w2": w2})
    assert run(model, "proj", [1.0] * 4) == pytest.approx([4.0, 2.0, 8.0, 4.0])


def vera_matrices(model: nn.Module, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    m = getattr(model, layer)
    return m.vera_A["default"].clone(), m.vera_B["default"].clone()


def test_vera_adds_b_times_frozen_b_times_d_times_frozen_a() -> None:
    """h = W x + b * (B (d * (A x))) with A, B the frozen shared matrices (cut to the layer)."""
    w = torch.arange(12.0).reshape(3, 4) / 10
    model = injected(VeraAdapterConfig(r=2, target_modules=["proj"]), Toy(proj=w.tolist()))
    assert sorted(get_state(model)) == ["proj.vera_lambda_b", "proj.vera_lambda_d"]  # A, B do not travel
    b, d = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.5, -1.0])
    set_state_(model, {"proj.vera_lambda_b": b, "proj.vera_lambda_d": d})
    a_full, b_full = vera_matrices(model, "proj")
    a, bb = a_full[:2, :4], b_full[:3, :2]  # [r, in], [out, r]
    x = torch.tensor([1.0, -1.0, 2.0, 0.5])
    want = w @ x + b * (bb @ (d * (a @ x)))
    assert run(model, "proj", x.tolist()) == pytest.approx(want.tolist(), abs=1e-5)
    assert float((bb @ (d * (a @ x))).abs().sum()) > 0  # the adapter term is not trivially zero


def test_vera_shared_matrices_are_seeded_and_frozen() -> None:
    options = VeraAdapterConfig(r=2, target_modules=["proj"])
    w = [[0.0] * 4] * 3
    one, same, other = (injected(options, Toy(proj=w), seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(vera_matrices(one, "proj"), vera_matrices(same, "proj")))
    assert not torch.equal(vera_matrices(one, "proj")[0], vera_matrices(other, "proj")[0])
    assert all(not p.requires_grad for n, p in one.named_buffers() if "vera_" in n)
    assert not any("vera_A" in k or "vera_B" in k for k in adapter_of(one).parameters(one))


def tiny(arch: str = "llama") -> tuple[ModelConfig, str]:
    mcfg = ModelConfig(name="tiny", tiny=TinyModelConfig(arch=arch))
    return mcfg, str(tiny_dir(mcfg, seed=0))


# trainable parameters of each kind on the tiny Llama (2 layers; q [64, 64], k, v [32, 64],
# down [64, 128]; 'auto' targets: q, v; IA3: k, v, down): the equal-budget accounting
COUNTS = {
    "dora": 2 * ((4 * 64 + 64 * 4 + 64) + (4 * 64 + 32 * 4 + 32)),  # A, B, m
    "vera": 2 * ((64 + 4) + (32 + 4)),  # b [out], d [r]
    "ia3": 2 * (32 + 32 + 128),  # k, v out-scaled; down in-scaled
    "loha": 2 * 2 * ((64 * 4 + 4 * 64) + (32 * 4 + 4 * 64)),  # two products per module
    "prompt_tuning": 8 * 64,  # 8 virtual tokens (the default) x hidden
    "prefix_tuning": 8 * 2 * 2 * 32,  # 8 positions x 2 layers x (key, value) x kv heads * head dim
}


@pytest.mark.parametrize("kind", sorted(COUNTS))
def test_trainable_parameters_are_counted_per_adapter(kind: str) -> None:
    from fedtune.config.adapters import ADAPTER_CONFIGS
    from fedtune.engines.federation import device_facts
    from fedtune.report.summary import setup_lines

    mcfg, d = tiny()
    options = ADAPTER_CONFIGS[kind](r=4)
    model = build_adapter(options).inject(load_model(d, mcfg), InjectContext(seed=0, model_type=model_type(d)))
    assert trainable_parameter_count(model) == COUNTS[kind]
    facts = device_facts(model)
    assert (facts["adapter"], facts["trainable_parameters"]) == (kind, COUNTS[kind])
    assert f"adapter {kind}: {COUNTS[kind]:,} trainable parameters" in setup_lines(facts, None)


@pytest.mark.parametrize(
    "kind,arch", [*((k, "llama") for k in KINDS), ("vera", "gpt2"), ("ia3", "gpt2")], ids=lambda v: str(v)
)
def test_export_loads_with_peft_and_gives_the_trained_logits(tmp_path, kind: str, arch: str) -> None:
    from peft import PeftModel

    from fedtune.config.adapters import ADAPTER_CONFIGS

    mcfg, d = tiny(arch)
    adapter = build_adapter(ADAPTER_CONFIGS[kind](r=4))
    model = adapter.inject(load_model(d, mcfg), InjectContext(seed=3, model_type=model_type(d)))
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in get_state(model).items()}
    set_state_(model, trained)
    ids = torch.randint(0, 250, (2, 16), generator=g)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = load_model(d, mcfg)(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the trained adapter changes the logits

    out = adapter_of(model).export(model, get_state(model), tmp_path / "adapter", d, None, None)
    loaded = PeftModel.from_pretrained(load_model(d, mcfg), str(out))
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# --- the algebra each kind declares, checked against the strategy at load time ---

EXACT = [  # (strategy, its parameters): each computes with s * B @ A (or B R A for fedsb)
    ("flora", {}),
    ("fedex_lora", {}),
    ("flexlora", {}),
    ("hetlora", {}),
    ("ffa_lora", {}),
    ("lora_fair", {}),
    ("robust", {"space": "dw"}),
    ("dp_fedavg", {"inner": "ffa_lora"}),
    ("fedsb", {}),
    ("comigs", {}),
]


def config(kind: str, strategy: str, **params):
    from fedtune.config import config_from_dict

    return config_from_dict({"adapter": {"kind": kind}, "strategy": {"name": strategy, **params}})


@pytest.mark.parametrize("kind", [*KINDS, "prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("strategy,params", EXACT, ids=[s for s, _ in EXACT])
def test_exact_strategies_refuse_the_peft_methods_by_name(strategy: str, params: dict, kind: str) -> None:
    from fedtune.adapters.base import ADAPTERS, ALGEBRA_TEXT
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config(kind, strategy, **params)
    (p,) = [p for p in err.value.problems if p.field == "adapter.kind"]
    assert p.value == kind and repr(kind) in p.constraint and "needs adapter.kind" in p.constraint
    assert ALGEBRA_TEXT[ADAPTERS.get(kind).algebra] in p.constraint  # the reason: what this kind's update is


@pytest.mark.parametrize("kind", [*KINDS, "prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize(
    "strategy,params", [("fedavg", {}), ("fedit", {}), ("fedadam", {"inner": "fedavg"}), ("local", {}), ("robust", {})]
)
def test_fedavg_family_strategies_take_the_peft_methods(strategy: str, params: dict, kind: str) -> None:
    assert config(kind, strategy, **params).adapter.kind == kind


def test_ia3_names_the_dropout_it_does_not_have() -> None:
    from fedtune.config import config_from_dict
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter.dropout.*no dropout"):
        config_from_dict({"adapter": {"kind": "ia3", "dropout": 0.1}})

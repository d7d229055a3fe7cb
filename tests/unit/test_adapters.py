import pytest
import torch

from fedtune.config.schema import LoraAdapterConfig, ModelConfig, TinyModelConfig
from fedtune.models.adapters import export_peft, get_state, inject_, lora_config, set_state_
from fedtune.models.load import load_model, model_type, tiny_dir


@pytest.mark.parametrize("arch,targets", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})])
def test_export_loads_with_peft_and_gives_the_same_logits(tmp_path, arch: str, targets: set[str]) -> None:
    from peft import PeftModel

    mcfg = ModelConfig(name="tiny", tiny=TinyModelConfig(arch=arch))
    d = str(tiny_dir(mcfg, seed=0))
    cfg = lora_config(LoraAdapterConfig(r=4, alpha=8), model_type(d))
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
    cfg = lora_config(LoraAdapterConfig(r=4), model_type(d))
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
    cfg = lora_config(LoraAdapterConfig(r=2), model_type(d))
    state = get_state(inject_(load_model(d, mcfg), cfg, seed=0))
    old = os.umask(0o022)
    try:
        peft_dir = export_peft(state, cfg, d, tmp_path / "peft")
        moe_dir = save_moe_adapter({"x": torch.ones(2)}, {"num_experts": 2}, tmp_path / "moe")
    finally:
        os.umask(old)
    for f in (peft_dir / "adapter_model.safetensors", moe_dir / "moe_adapter.safetensors", moe_dir / "moe_config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- the adapter contract: config union, registry, algebra checked against the strategy ---

EXACT = [  # (strategy, its parameters): each computes with s * B @ A (or B R A for fedsb)
    ("flora", {}),
    ("fedex_lora", {}),
    ("flexlora", {}),
    ("hetlora", {}),
    ("ffa_lora", {}),
    ("lora_fair", {}),
    ("robust", {"space": "dw"}),
    ("dp_fedavg", {"inner": "ffa_lora"}),
]


def config(adapter: dict, strategy: str = "fedavg", **params):
    from fedtune.config import config_from_dict

    return config_from_dict({"adapter": adapter, "strategy": {"name": strategy, **params}})


def test_a_config_without_kind_is_lora_and_every_shipped_config_loads() -> None:
    from pathlib import Path

    from fedtune.config import load_config
    from fedtune.config.schema import LoraAdapterConfig

    cfg = config({"r": 4, "alpha": 8.0})
    assert type(cfg.adapter) is LoraAdapterConfig and cfg.adapter.kind == "lora" and cfg.adapter.r == 4
    assert config({}).adapter.kind == "lora"
    for path in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        assert load_config(path).adapter.kind == "lora", path


def test_each_kind_has_only_its_own_options_and_a_foreign_one_is_named() -> None:
    from fedtune.errors import ConfigError

    assert config({"kind": "moe_lora", "experts": 3}).adapter.max_experts() == 3
    with pytest.raises(ConfigError) as err:
        config({"experts": 3, "sb_init": "source:stdlib"})
    text = str(err.value)
    assert "adapter.experts" in text and "not an option of adapter.kind 'lora'" in text and "moe_lora" in text
    assert "adapter.sb_init" in text and "set adapter.kind: lora_sb" in text
    with pytest.raises(ConfigError, match="'lora', 'lora_sb', 'moe_lora'"):
        config({"kind": "adalora"})


def test_a_config_saved_by_an_older_fedtune_still_loads() -> None:
    """Run directories hold config.yaml files that list every kind's options at their defaults."""
    from fedtune.config.schema import MoELoraAdapterConfig
    from fedtune.errors import ConfigError

    flat = {"kind": "moe_lora", "r": 8, "sb_init": "client", "sb_init_blocks": 8, "sb_init_lr": None, "experts": 3}
    assert type(config(flat).adapter) is MoELoraAdapterConfig
    with pytest.raises(ConfigError, match="adapter.sb_init_blocks"):  # set on purpose: not silently dropped
        config({**flat, "sb_init_blocks": 2})


def test_every_kind_is_registered_with_its_options_and_declares_its_algebra() -> None:
    from fedtune.adapters import ADAPTERS, KINDS, Algebra, build_adapter
    from fedtune.config.schema import ADAPTER_CONFIGS

    assert ADAPTERS.names() == sorted(ADAPTER_CONFIGS) == sorted(k.kind for k in KINDS)
    for kind, options in ADAPTER_CONFIGS.items():
        adapter = build_adapter(options())
        assert adapter.kind == kind and isinstance(adapter.algebra, Algebra)
    assert build_adapter(ADAPTER_CONFIGS["lora"]()).algebra is Algebra.LORA_PRODUCT


@pytest.mark.parametrize("kind", ["lora_sb", "moe_lora"])
@pytest.mark.parametrize("strategy,params", EXACT, ids=[s for s, _ in EXACT])
def test_exact_strategies_refuse_an_adapter_whose_update_is_not_s_b_a(strategy: str, params: dict, kind: str) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError) as err:  # at load time: no model or data is touched
        config({"kind": kind}, strategy, **params)
    problems = [p for p in err.value.problems if p.field == "adapter.kind"]
    assert len(problems) == 1, err.value
    p = problems[0]
    assert p.value == kind and "needs adapter.kind 'lora'" in p.constraint and "s * B @ A" in p.constraint
    assert repr(kind) in p.constraint and p.fix.startswith("set adapter.kind: lora")


@pytest.mark.parametrize(
    "strategy,kind,needs",
    [("fedsb", "lora", "lora_sb"), ("fedsb", "moe_lora", "lora_sb"), ("comigs", "lora", "moe_lora")],
)
def test_strategies_of_other_algebras_refuse_the_rest(strategy: str, kind: str, needs: str) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"needs adapter.kind '{needs}'.*set adapter.kind: {needs}"):
        config({"kind": kind}, strategy)


@pytest.mark.parametrize("kind", ["lora", "lora_sb", "moe_lora"])
@pytest.mark.parametrize(
    "strategy,params", [("fedavg", {}), ("fedit", {}), ("fedadam", {"inner": "fedavg"}), ("local", {}), ("robust", {})]
)
def test_fedavg_family_strategies_take_any_adapter_state(strategy: str, params: dict, kind: str) -> None:
    assert config({"kind": kind}, strategy, **params).adapter.kind == kind


def test_mixture_groups_its_router_and_adds_its_load_balancing_loss() -> None:
    from fedtune.adapters import build_adapter
    from fedtune.adapters.base import InjectContext
    from fedtune.adapters.moe_lora import load_balancing_loss
    from fedtune.config.schema import MoELoraAdapterConfig

    adapter = build_adapter(MoELoraAdapterConfig(router_lr=0.1, router_every=2, router_steps=3, lb_weight=0.5))
    mcfg = ModelConfig(name="tiny")
    model = adapter.inject(load_model(str(tiny_dir(mcfg, 0)), mcfg), InjectContext(seed=0, model_type="llama"))
    keys = sorted(get_state(model))
    experts, router = adapter.param_groups(keys)
    assert router.keys and all(k.endswith(".moe_router.weight") for k in router.keys)
    assert (router.lr, router.every, router.steps) == (0.1, 2, 3)
    assert set(experts.keys) | set(router.keys) == set(keys) and not set(experts.keys) & set(router.keys)
    frozen = build_adapter(MoELoraAdapterConfig(router="frozen", router_every=2))
    assert frozen.param_groups(keys)[1].every == 0  # a frozen router never takes its own steps
    assert adapter.aux_loss(model) is None  # no forward pass yet
    model(input_ids=torch.zeros((1, 8), dtype=torch.long))
    torch.testing.assert_close(adapter.aux_loss(model), 0.5 * load_balancing_loss(model))
    lora = build_adapter(LoraAdapterConfig())
    assert lora.aux_loss(model) is None and [g.name for g in lora.param_groups(keys)] == ["adapter"]


def _a_on_its_own_schedule(every: int):
    """A LoRA whose A factors take their own steps (a test double of a mixture's router group)."""
    from dataclasses import dataclass

    from fedtune.adapters.base import ParamGroup
    from fedtune.adapters.lora import LoRA

    @dataclass(frozen=True)
    class SideA(LoRA):
        def param_groups(self, keys):
            a = tuple(sorted(k for k in keys if ".lora_A." in k))
            return [ParamGroup("B", tuple(sorted(set(keys) - set(a)))), ParamGroup("A", a, lr=0.05, every=every)]

    return SideA()


@pytest.mark.parametrize("every,a_moves", [(None, True), (2, True), (10, False)], ids=["joint", "every-2", "never"])
def test_the_client_round_trains_the_groups_the_adapter_names(
    tiny_with_lora, random_shard, every: int | None, a_moves: bool
) -> None:
    """Which tensors take their own steps comes from the adapter's groups, not from key names:
    A alternates when its group says so, and is frozen between its turns (3 steps, every 10: never)."""
    from fedtune.client.round import client_round
    from fedtune.client.train import TrainSpec

    model, init = tiny_with_lora()
    adapter = None if every is None else _a_on_its_own_schedule(every)
    spec = TrainSpec(steps=3, batch_size=4, lr=0.05)
    delta, metrics, _ = client_round(model, init, random_shard("c1"), spec, 0, 1, adapter=adapter)
    a_change = sum(float(v.abs().sum()) for k, v in delta.items() if ".lora_A." in k)
    b_change = sum(float(v.abs().sum()) for k, v in delta.items() if ".lora_B." in k)
    assert b_change > 0 and (a_change > 0) == a_moves
    assert ("A_loss" in metrics) == (every == 2)  # the side group's own steps are recorded by its name


def test_each_kind_names_its_own_bad_combinations() -> None:
    """Problems that only one kind has come from that kind, once, by field."""
    from fedtune.components import per_client_problems
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config({"kind": "lora_sb", "ranks": [2, 4, 4, 8]}, "fedsb")
    ranks = [p for p in err.value.problems if p.field == "adapter.ranks"]
    assert len(ranks) == 1 and "one rank for all" in ranks[0].constraint
    with pytest.raises(ConfigError, match="adapter.sb_init.*outside the DP guarantee"):
        config({"kind": "lora_sb"}, "dp_fedavg", inner="fedsb")
    assert config({"kind": "lora_sb", "sb_init": "source:stdlib"}, "dp_fedavg", inner="fedsb")
    cfg = config({"kind": "moe_lora", "experts": [2, 3]})
    problems = per_client_problems(cfg, ["a", "b", "c"])
    assert [p.field for p in problems] == ["adapter.experts"] and "3 clients" in problems[0].constraint
    assert per_client_problems(cfg, ["a", "b"]) == []

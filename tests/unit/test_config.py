import pytest

from fedtune.config import config_from_dict, load_config
from fedtune.config.load import apply_overrides
from fedtune.errors import ConfigError


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return [str(p) for p in e.value.problems]


def test_unknown_key_lists_valid_keys() -> None:
    (p,) = problems({"train": {"stepz": 3}})
    assert p.startswith("train.stepz = 3: unknown key")
    assert "steps" in p and "batch_size" in p


def test_every_problem_is_reported_at_once() -> None:
    ps = problems({"rounds": 0, "train": {"lr": -1}, "partition": {"kind": "bogus"}, "colour": "red"})
    fields = sorted(p.split(" = ")[0] for p in ps)
    assert fields == ["colour", "partition.kind", "rounds", "train.lr"]
    rounds = next(p for p in ps if p.startswith("rounds"))
    assert "greater than or equal to 1" in rounds and "Fix:" in rounds


def test_unknown_names_are_reported_with_a_schema_problem() -> None:
    """A schema problem (rounds 0) hid the unknown names: one problem of four was reported."""
    ps = problems({"rounds": 0, "strategy": {"name": "fedavgg"}, "codec": {"name": "zip"}, "data": {"source": "wiki"}})
    assert sorted(p.split(" = ")[0] for p in ps) == ["codec.name", "data.source", "rounds", "strategy.name"]


def test_unknown_strategy_and_codec_name_valid_ones() -> None:
    ps = problems({"strategy": {"name": "fedmagic"}, "codec": {"name": "zip"}})
    assert any("strategy.name = 'fedmagic': unknown strategy" in p and "fedavg" in p for p in ps)
    assert any("codec.name = 'zip': unknown codec" in p and "fp16" in p for p in ps)


def test_unknown_strategy_parameter() -> None:
    (p,) = problems({"strategy": {"name": "fedavg", "momentum": 0.9}})
    assert p.startswith("strategy.momentum = 0.9: unknown parameter of strategy 'fedavg'")


@pytest.mark.parametrize(
    ("strategy", "field"),
    [
        ({"name": "dp_fedavg", "delta": 5}, "strategy.delta"),  # an epsilon "at delta 5" was reported
        ({"name": "dp_fedavg", "target_epsilon": -1}, "strategy.target_epsilon"),
        ({"name": "dp_fedavg", "clip": -0.1}, "strategy.clip"),  # flipped every update's sign
        ({"name": "dp_fedavg", "noise_multiplier": -1.0}, "strategy.noise_multiplier"),  # crashed after round 1
        ({"name": "tac", "clusters": 0}, "strategy.clusters"),  # crashed after round 1
        ({"name": "robust", "rule": "norm_bound", "max_norm": -1}, "strategy.max_norm"),
        ({"name": "robust", "f": -2}, "strategy.f"),
        ({"name": "fedadam", "beta1": 1.5}, "strategy.beta1"),
        ({"name": "gossip", "p": 2.0}, "strategy.p"),
    ],
)
def test_strategy_parameters_out_of_range_are_refused_by_name(strategy: dict, field: str) -> None:
    (p,) = problems({"strategy": strategy})
    assert p.startswith(f"{field} = ") and "Fix: give " in p


def test_non_finite_numbers_are_refused() -> None:
    (p,) = problems({"train": {"lr": float("inf")}})
    assert p.startswith("train.lr = inf")


def test_missing_data_path_and_model() -> None:
    ps = problems({"data": {"source": "files", "path": "/nope/x.jsonl"}, "model": {"name": "/nope/model"}})
    assert any(p.startswith("data.path = '/nope/x.jsonl': does not exist") for p in ps)
    assert any(p.startswith("model.name = '/nope/model'") for p in ps)


def test_partition_needs_num_clients() -> None:
    (p,) = problems({"partition": {"kind": "iid"}})
    assert "needs num_clients" in p


def test_bad_yaml_names_the_line(tmp_path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("rounds: 3\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(f)


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.5", "rounds=4", "data.labels=[a, b]", "name=x"])
    assert raw == {"train": {"lr": 0.5}, "rounds": 4, "data": {"labels": ["a", "b"]}, "name": "x"}


def test_shipped_configs_validate() -> None:
    from pathlib import Path

    for f in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        load_config(f)


def test_numbers_in_scientific_notation_reach_the_strategy_as_numbers(tmp_path) -> None:
    """YAML 1.1 reads `1e-6` as a string; the landed code passed that string to the strategy
    (a crash deep in DP-FedAvg's noise). --set parses it as a number, and a strategy is built
    from its validated, type-coerced parameters."""
    from fedtune import components
    from fedtune.config import load_config

    cfg = load_config(None, ["strategy.name=dp_fedavg", "strategy.noise_multiplier=1e-6"])
    assert cfg.strategy.params()["noise_multiplier"] == 1e-6
    f = tmp_path / "c.yaml"
    f.write_text("strategy: {name: dp_fedavg, noise_multiplier: 1e-6, clip: '0.5'}\n")
    s = components.build_strategy(load_config(f), components.run_context(load_config(f), ["a", "b"], 1.0))
    assert (s.noise_multiplier, s.clip) == (1e-6, 0.5) and isinstance(s.clip, float)


def test_nothing_leaves_the_dp_guarantee_and_stateful_downlinks_are_refused(tiny_cfg) -> None:
    """Under a reported DP guarantee: no raw-data exchange (PCL predictions, Bristle) and no
    LoRA-SB init from a client's data. A stateful downlink codec (error feedback, lazy uploads)
    is refused on every engine (the landed in-process engine trained clients on a model with
    83-95 % of its entries missing)."""
    from fedtune.errors import ConfigError

    dp = ("train.dp_sgd.noise_multiplier=1.0",)
    with pytest.raises(ConfigError, match="raw client data"):
        tiny_cfg(*dp, "strategy.name=pcl", "strategy.trust=predictions")
    with pytest.raises(ConfigError, match="raw client data"):
        tiny_cfg(*dp, "strategy.name=bristle")
    with pytest.raises(ConfigError, match="outside the DP guarantee"):
        tiny_cfg(*dp, "strategy.name=fedsb", "adapter.kind=lora_sb")
    tiny_cfg(*dp, "strategy.name=fedsb", "adapter.kind=lora_sb", "adapter.sb_init=source:stdlib")  # public: fine
    tiny_cfg(*dp, "strategy.name=pcl", "strategy.trust=weights")
    with pytest.raises(ConfigError, match="stateful codec"):
        tiny_cfg("codec.name=topk")
    tiny_cfg("codec.name=topk", "downlink_codec.name=identity")


def test_a_key_given_twice_in_the_yaml_is_refused_with_its_lines(tmp_path) -> None:
    """yaml.safe_load kept the last of two keys silently: a second `train:` replaced the first."""
    f = tmp_path / "dup.yaml"
    f.write_text("rounds: 2\ntrain:\n  steps: 4\n  lr: 0.01\nmodel: {name: tiny}\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice \(lines 2 and 6\)"):
        load_config(f)


def test_a_tiny_model_transformers_cannot_build_is_a_config_problem() -> None:
    """heads 5 with hidden 64 raised a transformers traceback from inside `fedtune validate`."""
    (p,) = problems({"model": {"name": "tiny", "tiny": {"heads": 5}}})
    assert p.startswith("model.tiny = ") and "multiple of heads = 5" in p
    (p,) = problems({"model": {"name": "tiny", "tiny": {"heads": 5, "hidden": 80}}})
    assert "heads // 2 key/value heads" in p


def test_client_ids_that_would_share_an_adapter_folder_are_refused() -> None:
    """A client named 'global' exported its personal adapter where `fedtune export RUN` reads the
    global model; 'a/b' and 'a_b' shared adapters/a_b."""
    from fedtune import components

    cfg = load_config("configs/tiny.yaml")
    got = [str(p) for p in components.per_client_problems(cfg, ["global", "a/b", "a_b", "c"])]
    assert len(got) == 2 and "adapters/global would be the global model's" in got[0]
    assert "adapters/a_b would be client 'a/b''s" in got[1]


def test_instruction_columns_with_plain_text_are_refused() -> None:
    (p,) = problems({"data": {"source": "files", "path": "configs", "columns": {"prompt": "q"}}})
    assert "data.format is 'text'" in p


def test_a_boolean_where_a_number_belongs_is_refused() -> None:
    """pydantic's lax mode read `rounds: true` as 1 and `lr: true` as 1.0, silently."""
    ps = problems({"rounds": True, "train": {"lr": True}, "adapter": {"kind": "lora", "r": True}})
    assert sorted(p.split(" = ")[0] for p in ps) == ["adapter.r", "rounds", "train.lr"]
    assert all("a boolean where a number belongs" in p for p in ps)
    assert config_from_dict({"train": {"bf16": True}, "evaluation": {"ood": True}}).train.bf16 is True

"""The search space of `fedtune tune`: parsed into ranges, and every mistake refused by file, key
and value before any trial trains."""

from pathlib import Path

import pytest
import yaml

from fedtune.config.load import read_yaml, with_values
from fedtune.config.space import Choices, FloatRange, IntRange, load_space
from fedtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base() -> dict:
    return read_yaml(ROOT / "configs" / "tiny.yaml")


def write(tmp_path: Path, space: dict) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space))
    return p


def test_the_three_kinds_of_range(tmp_path, base) -> None:
    space = {
        "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "train.steps": {"low": 4, "high": 16, "step": 4},
        "adapter.r": {"choices": [4, 8, 16]},
    }
    got = load_space(write(tmp_path, space), base)
    assert got == {
        "train.lr": FloatRange(1e-4, 1e-2, log=True),
        "train.steps": IntRange(4, 16, step=4),
        "adapter.r": Choices((4, 8, 16)),
    }


def test_every_mistake_is_reported_at_once_by_file_key_and_value(tmp_path, base) -> None:
    space = {
        "train.lrr": {"low": 1.0e-4, "high": 1.0e-2},  # no such key
        "train.lr": {"low": 1.0e-2, "high": 1.0e-4},  # reversed
        "train.steps": {"low": 0, "high": 8},  # the schema needs steps >= 1
        "adapter.r": {"choices": []},
        "train.batch_size": {"low": 1.0, "high": 8.0},  # an integer setting given a float range
        "train.grad_accum": {"low": 1, "high": 8, "step": 3},
        "output_dir": {"choices": ["a", "b"]},
        "train.max_grad_norm": {"low": 0.0, "high": 1.0, "log": True},
    }
    path = write(tmp_path, space)
    with pytest.raises(ConfigError) as e:
        load_space(path, base)
    by_key = {p.field.split(": ", 1)[1]: p for p in e.value.problems}
    assert all(p.field.startswith(f"{path}: ") for p in e.value.problems)
    assert sorted(by_key) == sorted(space)
    assert "unknown key" in by_key["train.lrr"].constraint and "lr" in by_key["train.lrr"].fix
    assert by_key["train.lr"].constraint == "low must be below high"
    assert by_key["train.steps"].value == 0 and "greater than or equal to 1" in by_key["train.steps"].constraint
    assert by_key["adapter.r"].constraint == "choices must be a non-empty list"
    batch = by_key["train.batch_size"]  # the ends pass as integers; the inner probe does not
    assert batch.value == 4.5 and "write integers, e.g. low: 1, high: 8" in batch.fix
    assert "multiple of step" in by_key["train.grad_accum"].constraint and "high: 7" in by_key["train.grad_accum"].fix
    assert "cannot be searched" in by_key["output_dir"].constraint
    assert "low > 0" in by_key["train.max_grad_norm"].constraint
    assert str(path) in str(e.value)


def test_with_values_sets_dotted_keys_like_set_without_touching_the_input(base) -> None:
    before = yaml.safe_dump(base)
    out = with_values(base, {"train.lr": 0.01, "strategy.mu": 0.1})
    assert out["train"]["lr"] == 0.01 and out["strategy"] == {"name": "fedavg", "mu": 0.1}
    assert yaml.safe_dump(base) == before


@pytest.mark.parametrize("config", ["tiny.yaml", "demo.yaml", "chat.yaml"])
def test_the_shipped_space_fits_the_shipped_configs(config) -> None:
    space = load_space(ROOT / "configs" / "spaces" / "lr-rank-steps.yaml", read_yaml(ROOT / "configs" / config))
    assert space["adapter.r"] == Choices((2, 4, 8)) and space["train.steps"] == IntRange(2, 8, step=2)

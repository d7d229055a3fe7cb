import pytest
from pydantic import ValidationError

from fedtune.components import build_train_spec
from fedtune.config.schema import ExperimentConfig, TrainConfig
from fedtune.embedding.checks import embedding_problems, ghost_noise_problems


def test_ghost_noise_is_off_by_default_and_reaches_the_train_spec():
    assert build_train_spec(ExperimentConfig(train={"bf16": False})).ghost_batch is None
    spec = build_train_spec(ExperimentConfig(train={"bf16": False, "ghost_noise": {"batch_size": 8, "eps": 0.01}}))
    assert spec.ghost_batch == 8 and spec.ghost_eps == 0.01


def test_ghost_noise_refuses_dp_sgd_and_a_ghost_batch_of_one():
    with pytest.raises(ValidationError, match="ghost_noise"):
        TrainConfig(ghost_noise={"batch_size": 8}, dp_sgd={"noise_multiplier": 1.0})
    with pytest.raises(ValidationError):
        TrainConfig(ghost_noise={"batch_size": 1})


def test_ghost_noise_refused_for_strategies_with_their_own_client_step():
    cfg = ExperimentConfig(train={"ghost_noise": {}}, strategy={"name": "fedkseed"})
    assert [p.field for p in ghost_noise_problems(cfg, client_step=True)] == ["train.ghost_noise"]
    assert ghost_noise_problems(cfg, client_step=False) == []


def test_embedding_problems_name_field_value_and_fix():
    assert embedding_problems(ExperimentConfig(strategy={"name": "fedkseed"})) == []  # other tasks: none
    cfg = ExperimentConfig(
        task="embedding",
        strategy={"name": "fedkseed"},
        data={"source": "files", "path": "x", "block_size": 8},
        embedding={"num_tokens": 7},
        secure_aggregation=True,
        train={"prox_mu": 0.1},
    )
    problems = {p.field: p for p in embedding_problems(cfg)}
    assert set(problems) == {"strategy.name", "data.format", "data.block_size", "secure_aggregation", "train.prox_mu"}
    assert problems["strategy.name"].value == "fedkseed" and "fedavg" in problems["strategy.name"].fix
    assert "9" in problems["data.block_size"].fix

"""The same experiment on Flower's simulation runtime gives the same numbers as in-process."""

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (make test installs it)")

from fedtune.errors import ConfigError  # noqa: E402
from fedtune.recipes.federated import run_federated  # noqa: E402

pytestmark = pytest.mark.flower


def no_time(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


@pytest.mark.parametrize("strategy", ["fedavg", "flora"])
def test_flower_simulation_matches_inprocess(tiny_cfg, strategy: str) -> None:
    from fedtune.engines.flower import run_simulation

    over = [f"strategy.name={strategy}", "rounds=2", "train.steps=2"]
    if strategy == "flora":
        over.append("adapter.ranks=[2, 4, 4, 8]")
    local = run_federated(tiny_cfg(*over, name="inproc"), progress=False)
    sim = run_simulation(tiny_cfg(*over, name="sim"), num_clients=4)
    assert no_time(sim.records) == no_time(local.records)  # losses, ppl, bytes: identical
    assert (sim.run_dir / "adapters" / "global" / "adapter_model.safetensors").exists()


def test_flower_refuses_what_it_cannot_run(tiny_cfg) -> None:
    from fedtune.engines.flower import check_flower

    with pytest.raises(ConfigError, match="pools raw data"):
        check_flower(tiny_cfg("strategy.name=centralized", "engine.name=flower-sim"))
    with pytest.raises(ConfigError, match="from public data"):
        check_flower(tiny_cfg("strategy.name=fedsb", "adapter.kind=lora_sb", "engine.name=flower-sim"))

"""Every strategy runs end to end on the tiny model, helps every client, exports a PEFT adapter
that reproduces the trained model, and resumes after an interruption with the same numbers."""

import pytest
import torch

from fedtune.recipes.federated import run_federated
from fedtune.report import io

# name -> extra overrides (the test matrix: add a row per new strategy)
MATRIX = {
    "fedavg": [],
    "fedit": [],
    "ffa_lora": ["train.lr=0.02"],
    "fedex_lora": [],
    "flora": ["adapter.ranks=[2, 4, 4, 8]"],
    "fedadam": ["strategy.inner=ffa_lora", "strategy.server_lr=0.01", "train.lr=0.02"],
    "fedavgm": ["strategy.server_lr=1.0", "strategy.beta1=0.5"],
    "fedyogi": ["strategy.server_lr=0.01"],
    "flexlora": ["adapter.ranks=[2, 4, 4, 8]"],
    "hetlora": ["adapter.ranks=[2, 4, 4, 8]"],
    "lora_fair": [],
    "fedsb": ["adapter.kind=lora_sb", "train.lr=0.02"],
    "local": [],
    "centralized": [],
}


class Interrupt(Exception):
    pass


def no_time(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


@pytest.mark.parametrize("name", list(MATRIX))
def test_strategy_end_to_end_and_resume(tiny_cfg, name: str) -> None:
    over = (f"strategy.name={name}", "rounds=3", "train.steps=3", *MATRIX[name])
    full = run_federated(tiny_cfg(*over, name="full"), progress=False)
    rounds = {r["round"]: r for r in full.records if r["client"] is None}
    assert rounds[3]["mean_ppl"] < rounds[0]["mean_ppl"]

    cfg = tiny_cfg(*over, name="cut")

    def stop(rnd: int) -> None:
        if rnd == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_federated(cfg, progress=False, after_round=stop)
    resumed = run_federated(cfg, resume=True, progress=False)
    assert no_time(resumed.records) == no_time(full.records)


@pytest.mark.parametrize("name", ["fedex_lora", "flora", "ffa_lora", "fedsb"])
def test_exported_adapter_reproduces_the_global_model(tiny_cfg, name: str) -> None:
    from peft import PeftModel

    from fedtune.config.schema import AdapterConfig, ModelConfig
    from fedtune.models.adapters import inject_, lora_config, set_state_
    from fedtune.models.load import load_model, tiny_dir

    over = (f"strategy.name={name}", "rounds=2", "train.steps=3", *MATRIX[name])
    run = run_federated(tiny_cfg(*over, name="exp"), progress=False)
    glob = io.load_checkpoint(run.run_dir / io.CHECKPOINT)["global"]
    mcfg = ModelConfig(name="tiny")
    d = str(tiny_dir(mcfg, 0))
    # the engine's view: base + offsets + adapter at the run's max rank and scale alpha/r = 2
    if name == "fedsb":
        from fedtune.adapters.lora_sb import inject_lora_sb_

        ours = inject_lora_sb_(load_model(d, mcfg), ["q_proj", "v_proj"], 4, torch.zeros(1, 8, dtype=torch.long), 0.0)
    else:
        r = max(v.shape[0] for k, v in glob.items() if k.endswith("lora_A.weight"))
        ours = inject_(load_model(d, mcfg), lora_config(AdapterConfig(r=r, alpha=2.0 * r), "llama"), 0)
    set_state_(ours, glob)
    theirs = PeftModel.from_pretrained(load_model(d, mcfg), str(run.run_dir / "adapters" / "global"))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

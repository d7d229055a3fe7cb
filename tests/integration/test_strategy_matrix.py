"""Every strategy runs end to end on the tiny model, helps every client, exports a PEFT adapter
that reproduces the trained model, and resumes after an interruption with the same numbers."""

import pytest
import torch

from fedtune.recipes.federated import run_federated
from fedtune.report import io

# name[:variant] -> extra overrides (the test matrix: add a row per new strategy)
MATRIX = {
    "fedavg": [],
    # fedit = fedavg's algorithm (its aggregation-error log: test_resume)
    "ffa_lora": ["train.lr=0.02"],
    "fedex_lora": [],
    "flora": ["adapter.ranks=[2, 4, 4, 8]"],
    "fedadam": ["strategy.inner=ffa_lora", "strategy.server_lr=0.01", "train.lr=0.02"],
    "fedavgm": ["strategy.server_lr=1.0", "strategy.beta1=0.5"],
    "fedyogi": ["strategy.server_lr=0.01"],
    "diloco": ["strategy.server_lr=0.7", "strategy.beta1=0.5"],
    "flexlora": ["adapter.ranks=[2, 4, 4, 8]"],
    "hetlora": ["adapter.ranks=[2, 4, 4, 8]"],
    "lora_fair": [],
    "fedsb": ["adapter.kind=lora_sb", "train.lr=0.02"],
    "local": [],
    "centralized": [],
    "local:moe-frozen-router": ["adapter.kind=moe_lora", "adapter.router=frozen", "adapter.top_k=1"],
    "comigs": ["adapter.kind=moe_lora", "strategy.preset=1G1S", "evaluation.ood=true"],
    "comigs:hetero-sequence": ["adapter.kind=moe_lora", "adapter.experts=[2, 2, 3, 3]", "adapter.router=sequence"],
    "fedavg:rm_lora": ["adapter.kind=rm_lora", "adapter.mask_prob=0.2", "adapter.reg_weight=0.01"],
    "local:rm_lora": ["adapter.kind=rm_lora"],
    "fedavg:smore": ["adapter.kind=smore", "train.lr=0.01"],
    "local:smore": ["adapter.kind=smore", "adapter.fanout=1", "train.lr=0.01"],
    "comigs:smore": ["adapter.kind=smore", "strategy.preset=1G1S", "adapter.router_every=2", "train.lr=0.01"],
    "pcl": ["strategy.trust=val"],
    "pcl:predictions": ["strategy.trust=predictions", "strategy.top_k=8"],
    "tac": ["strategy.clusters=2"],
    "gossip": ["strategy.topology=ring"],
    "dfedsam": ["strategy.topology=ring", "train.sam_rho=0.05"],
    "dimat": ["strategy.topology=ring"],
    "bristle_p2p": ["strategy.topology=ring", "strategy.reference_blocks=2"],
    "pcl_p2p": ["strategy.topology=ring", "strategy.trust=val"],
    "modest": ["strategy.trainers=2", "strategy.aggregators=2"],
    # codec state (error-feedback residuals) must survive the interruption too
    "fedavg:topk-ef-q4": [
        "codec.name=chain",
        "codec.stages=[{name: topk, fraction: 0.2}, {name: quantize, bits: 4}]",
        "downlink_codec.name=quantize",
    ],
    "fedavg:aquila": ["codec.name=aquila", "downlink_codec.name=fp16"],
    "fedkseed": ["strategy.lr=0.05", "strategy.num_seeds=256", "strategy.pro=true", "train.steps=8"],
    "fedkseed:full-one-byte": [  # full-parameter (every linear weight of the tiny model), one-byte scalars
        "strategy.lr=0.01",
        "strategy.num_seeds=256",
        "strategy.one_byte=true",
        "strategy.full=true",
        "adapter.target_modules=all-linear",
        "train.steps=8",
    ],
    "ferret": ["train.lr=0.5", "strategy.bases=32"],
    "safari": ["sampling.dropout=0.3", "codec.name=topk", "codec.fraction=0.5", "downlink_codec.name=identity"],
    "dp_fedavg": [
        "strategy.inner=ffa_lora",
        "strategy.noise_multiplier=0.5",
        "strategy.clip=0.5",
        "strategy.adaptive=true",
        "train.lr=0.02",
    ],
    "robust": ["strategy.rule=trimmed_mean", "strategy.trim=0.25", "attack.kind=sign_flip", "attack.fraction=0.25"],
    "ffa_lora:q8-down-fp16": ["train.lr=0.02", "codec.name=quantize", "codec.bits=8", "downlink_codec.name=fp16"],
    # PEFT's methods beyond LoRA (FedAvg averages their trainable state; exact strategies refuse them)
    "fedavg:dora": ["adapter.kind=dora"],
    "fedavg:vera": ["adapter.kind=vera", "train.lr=0.02"],
    "fedavg:ia3": ["adapter.kind=ia3", "train.lr=0.02"],
    "fedavg:loha": ["adapter.kind=loha"],
    "fedavg:lokr": ["adapter.kind=lokr"],
    "fedavg:prompt_tuning": ["adapter.kind=prompt_tuning", "train.lr=0.05"],
    "fedavg:prefix_tuning": ["adapter.kind=prefix_tuning", "train.lr=0.05"],
}


def serialize(state: dict) -> bytes:
    """The identity codec's payload of `state` (fp32 tensors + the codec's stage metadata)."""
    from fedtune.codecs import make_codec

    return make_codec("identity").encode(state, None, torch.Generator())[0]


@pytest.mark.parametrize("name", list(MATRIX))
def test_strategy_end_to_end_and_resume(tiny_cfg, tmp_path, no_time, fresh_cli, name: str) -> None:
    import shutil

    over = (f"strategy.name={name.split(':')[0]}", "rounds=3", "train.steps=3", *MATRIX[name])
    cfg = tiny_cfg(*over, name="full")
    cut = tmp_path / "cut"

    def kill_point(rnd: int) -> None:  # the run directory as a kill right after round 2's checkpoint leaves it
        if rnd == 2:
            shutil.copytree(cfg.run_dir(), cut)

    # uninterrupted, in this process (test_cli covers `fedtune run --set ...`)
    run_federated(cfg, progress=False, after_round=kill_point)
    full = io.read_jsonl(tmp_path / "full" / io.METRICS)
    rounds = {r["round"]: r for r in full if r["client"] is None}
    assert rounds[3]["mean_ppl"] < rounds[0]["mean_ppl"]
    if "rm_lora" in name:  # the mechanism, logged per round (mean over the round's clients)
        assert all(0.0 < rounds[r]["adapter_effective_rank"] <= 8.0 for r in (1, 2, 3))

    # the copy cut after round 2, resumed by `fedtune run --resume` in a fresh process that knows
    # only the run directory (forked from one that has only imported fedtune: tests/forkserver.py;
    # test_resume and test_run_dir cover runs that really stop there: an exception, a SIGKILL mid-write)
    assert [r["round"] for r in io.read_jsonl(cut / io.METRICS)][-1] == 2
    r = fresh_cli("run", "--resume", str(cut), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert no_time(io.read_jsonl(cut / io.METRICS)) == no_time(full)


@pytest.mark.parametrize("name", list(MATRIX))
def test_strategy_runs_on_a_bf16_base_under_bf16_autocast(tiny_cfg, name: str) -> None:
    """What `auto` picks where bf16 is native (CUDA, AVX512-BF16 / AMX CPUs), which the fp32 matrix
    above never runs: IA3 and VeRA crashed there (test_device). A strategy that writes offsets into
    the base weights (its declared `base_offsets`) refuses a bf16 base by name, and runs on an fp32
    base under bf16 autocast, as `auto` then gives it."""
    from fedtune.components import strategy_capabilities
    from fedtune.errors import ConfigError

    over = (f"strategy.name={name.split(':')[0]}", *MATRIX[name], "rounds=1", "train.steps=1", "train.bf16=true")
    cfg = tiny_cfg(*over, "model.dtype=float32", name="fp32-base")
    caps = strategy_capabilities(cfg)
    assert caps is not None
    if caps.base_offsets:
        with pytest.raises(ConfigError, match="writes offsets into the base weights"):
            tiny_cfg(*over, "model.dtype=bfloat16")
    else:
        cfg = tiny_cfg(*over, "model.dtype=bfloat16")
    run = run_federated(cfg, progress=False)
    rounds = {r["round"]: r for r in run.records if r["client"] is None}
    assert rounds[0]["base_dtype"] == ("float32" if caps.base_offsets else "bfloat16")
    assert rounds[0]["bf16_autocast"] is True
    clients = [r for r in run.records if r["round"] == 1 and r["client"] is not None]
    # train_loss where the strategy releases it (DP-FedAvg does not); every client's test loss
    losses = [r[k] for r in clients for k in ("train_loss", "test_loss", "personal_loss") if k in r]
    assert len([r for r in clients if "test_loss" in r]) == len(clients) > 0
    assert all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert torch.isfinite(torch.tensor(rounds[1]["mean_ppl"]))


@pytest.mark.parametrize("name", ["fedex_lora", "flora", "ffa_lora", "fedsb"])
def test_exported_adapter_reproduces_the_global_model(tiny_cfg, name: str) -> None:
    from peft import PeftModel

    from fedtune.config.schema import LoraAdapterConfig, ModelConfig
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
        ours = inject_(load_model(d, mcfg), lora_config(LoraAdapterConfig(r=r, alpha=2.0 * r), "llama"), 0)
    set_state_(ours, glob)
    theirs = PeftModel.from_pretrained(load_model(d, mcfg), str(run.run_dir / "adapters" / "global"))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["fedex_lora", "flora"])
def test_merging_strategies_count_the_dense_offset_on_the_downlink(tiny_cfg, name: str) -> None:

    from fedtune.models.adapters import BASE_DELTA

    over = (f"strategy.name={name}", "rounds=1", "train.steps=2")
    run = run_federated(tiny_cfg(*over, name="bytes"), progress=False)
    glob = io.load_checkpoint(run.run_dir / io.CHECKPOINT)["global"]
    lora = {k: v for k, v in glob.items() if not k.endswith(BASE_DELTA)}
    recs = [r for r in run.records if r["client"] and r["round"] == 1]
    # uplink: the trained A and B; downlink: A, B and the dense d x k offset of every module
    assert {r["bytes_up"] for r in recs} == {len(serialize(lora))}
    assert {r["bytes_down"] for r in recs} == {len(serialize(glob))}
    dense = sum(v.numel() for k, v in glob.items() if k.endswith(BASE_DELTA))
    assert len(serialize(glob)) - len(serialize(lora)) >= 4 * dense


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora"])
def test_a_rank_r_client_moves_rank_r_factors(tiny_cfg, name: str) -> None:

    from fedtune.models.adapters import BASE_DELTA
    from fedtune.strategies.merge import truncate_rank

    run = run_federated(
        tiny_cfg(f"strategy.name={name}", "rounds=1", "train.steps=2", "adapter.ranks=[2, 4, 4, 8]", name="ranks"),
        progress=False,
    )
    glob = io.load_checkpoint(run.run_dir / io.CHECKPOINT)["global"]
    lora = {k: v for k, v in glob.items() if not k.endswith(BASE_DELTA)}
    ups = {r["client"]: r["bytes_up"] for r in run.records if r["client"] and r["round"] == 1}
    ranks = dict(zip(sorted(ups), [2, 4, 4, 8]))
    for cid, n in ups.items():
        assert n == len(serialize(truncate_rank(lora, ranks[cid])))
    assert ups["email"] < ups["http"] == ups["json"] < ups["logging"]


@pytest.mark.parametrize("kind", ["dora", "vera", "ia3", "loha", "lokr"])
def test_a_peft_method_run_exports_what_peft_loads(tiny_cfg, kind: str) -> None:
    """The run's adapters/global, loaded by PeftModel.from_pretrained, gives the logits of the
    engine's model (the same seeded injection; VeRA's shared matrices) with the global state."""
    from peft import PeftModel

    from fedtune.adapters import build_adapter
    from fedtune.adapters.base import InjectContext
    from fedtune.models.adapters import set_state_
    from fedtune.models.load import load_model, tiny_dir
    from fedtune.seeding import derive_seed

    cfg = tiny_cfg("strategy.name=fedavg", "rounds=1", "train.steps=3", *MATRIX[f"fedavg:{kind}"], name="exp")
    run = run_federated(cfg, progress=False)
    glob = io.load_checkpoint(run.run_dir / io.CHECKPOINT)["global"]
    d = str(tiny_dir(cfg.model, cfg.seed))
    ctx = InjectContext(seed=derive_seed(cfg.seed, "adapter-init"), model_type="llama")
    ours = build_adapter(cfg.adapter).inject(load_model(d, cfg.model), ctx)
    set_state_(ours, glob)
    theirs = PeftModel.from_pretrained(load_model(d, cfg.model), str(run.run_dir / "adapters" / "global"))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

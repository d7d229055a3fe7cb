"""Trained tokens per second of one client's local step on the demo's instruction data, against
TRL's SFTTrainer on the same model, examples, batch and LoRA, and against this machine's GEMM peak.

    .venv/bin/pip install -e '.[bench]'     # trl
    .venv/bin/python bench/throughput.py    # SmolLM2-135M-Instruct, configs/demo.yaml's data

Rows (each the median step time over --steps optimizer steps after one warm-up step):
  fedtune fp32                fp32 weights, no autocast
  fedtune bf16 autocast       fp32 frozen base re-cast to bf16 by autocast at every matmul
  fedtune bf16 base           model.dtype bfloat16 (frozen base stored in bf16), fp32 LoRA, autocast
  fedtune bf16 base, full head  the same with the LM head over every position (what TRL computes)
  ..., eager attention        model.attention: eager instead of transformers' default (sdpa)
  ..., grouped attention      model.attention: grouped (fedtune.models.attention; the demo's)
  ..., packed                 train.packing: the batch's examples end to end in fewer rows
                              (fedtune.client.packing), no padding run
  TRL SFTTrainer fp32 / bf16  completion-only loss, the same prompt/completion pairs (TRL applies
                              the same chat template), batch 4, the same LoRA; padding_free where
                              TRL allows it (it needs a flash-attention kernel: not on CPU), else padded
Tokens = real (non-padding) tokens of the batches, counted identically on both sides.
Utilisation = the step's FLOPs (torch's FlopCounterMode, one step) / time / the GEMM peak of the
dtype the matmuls run in (a timed 2048 x 2048 matmul on the same threads). This machine's speed
drifts by 2-4x within minutes (its bf16 GEMM runs on AMX units shared with other tenants), so the
peak is taken twice: around each row (the row's share), and as a short burst between every two
steps, each step's share taken against the bursts just before and after it (the median per step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def client_data(cfg: Any) -> tuple[Any, Any, Any]:
    from fedtune.engines.federation import load_shards
    from fedtune.models.load import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(cfg.model, cfg.seed))
    shards, _ = load_shards(cfg, tok)
    shard = max(shards.values(), key=lambda s: s.num_examples)
    return shard, tok, resolve_model_dir(cfg.model, cfg.seed)


def real_tokens(mask: torch.Tensor) -> int:
    """Tokens up to each row's last target (right padding after it is not a real token)."""
    last = torch.where(mask.any(dim=1), mask.shape[1] - mask.flip(1).float().argmax(dim=1), 0)
    return int(last.sum())


def fedtune_row(
    cfg: Any,
    shard: Any,
    model_dir: str,
    bf16: bool,
    base: str,
    steps: int,
    full_head: bool,
    attention: str,
    packing: bool = False,
) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from fedtune.client import train
    from fedtune.client.train import TrainData, TrainSpec, batch_indices, local_train_
    from fedtune.engines.federation import build_adapted_model

    mcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": base, "attention": attention})})
    model, _ = build_adapted_model(mcfg, model_dir, {}, None)
    params = [p for p in model.parameters() if p.requires_grad]
    spec = TrainSpec(steps=steps + 1, batch_size=cfg.train.batch_size, lr=cfg.train.lr, bf16=bf16, packing=packing)
    order = batch_indices(shard.num_examples, spec.batch_size, torch.Generator().manual_seed(0))  # = training's
    batches = [next(order) for _ in range(steps + 1)]
    tokens = [real_tokens(shard.train_mask[b]) for b in batches]
    real = train.target_loss
    if full_head:  # the LM head over every position, as HF's loss (and TRL) compute it

        def full(model: Any, batch: torch.Tensor, mask: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, int]:
            batch, mask = train.trim_padding(batch, mask)
            with train.autocast(bf16, "cpu", model):
                loss = model(input_ids=batch, labels=batch.masked_fill(~mask, -100)).loss
            n = int(mask[:, 1:].sum())
            return loss * n, n

        train.target_loss = full
    times: list[float] = []
    kind = torch.bfloat16 if bf16 else torch.float32
    peaks = [gemm_peak(kind, reps=4)]  # a short GEMM burst before every step and after the last
    last = [time.perf_counter()]

    def on_step(step: int, total: int, loss: float) -> None:
        times.append(time.perf_counter() - last[0])
        peaks.append(gemm_peak(kind, reps=4))  # not timed as part of any step
        last[0] = time.perf_counter()

    try:
        gen = torch.Generator().manual_seed(0)  # the same stream local_train_ draws its batches from
        last[0] = time.perf_counter()
        out = local_train_(model, params, TrainData(shard.train, shard.train_mask), spec, gen, on_step=on_step)
        flops = []  # each timed step's FLOPs, counted afterwards (the counter slows what it counts)
        for b in batches[1:]:
            with FlopCounterMode(display=False) as fc:
                train.lm_loss(model, shard.train[b], bf16, mask=shard.train_mask[b], pack=packing).backward()
            flops.append(fc.get_total_flops())
            model.zero_grad(set_to_none=True)
    finally:
        train.target_loss = real
    step_s = statistics.median(times[1:])
    # each step's FLOP rate against the mean of the GEMM bursts just before and after it
    util = [f / t / ((peaks[i] + peaks[i + 1]) / 2 * 1e9) for i, (f, t) in enumerate(zip(flops, times[1:]), 1)]
    return {
        "step_seconds": step_s,
        "tokens_per_step": statistics.mean(tokens[1:]),
        "tokens_per_second": sum(tokens[1:]) / sum(times[1:]),
        "gflops_per_second": sum(flops) / sum(times[1:]) / 1e9,
        "step_peak_share": util,
        "step_peak_share_median": statistics.median(util),
        "step_peak_gflops": peaks,
        "loss": out["train_loss"],
    }


def trl_row(shard: Any, tok: Any, model_dir: str, cfg: Any, bf16: bool, steps: int) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fedtune.models.adapters import lora_config
    from fedtune.models.load import model_type

    # the same examples, decoded back to text pairs from fedtune's rendered rows
    pairs = []
    for row, mask in zip(shard.train, shard.train_mask):
        idx = torch.nonzero(mask).flatten()
        first, last = int(idx.min()), int(idx.max()) + 1
        pairs.append({"prompt": tok.decode(row[:first]), "completion": tok.decode(row[first:last])})
    ds = datasets.Dataset.from_list(pairs)
    ours = lora_config(cfg.adapter, model_type(model_dir))
    lora = LoraConfig(r=ours.r, lora_alpha=ours.lora_alpha, target_modules=ours.target_modules, lora_dropout=0.0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t)

    args = SFTConfig(
        output_dir="/tmp/fedtune-trl-bench",
        max_steps=steps + 1,
        per_device_train_batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        bf16=bf16,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        completion_only_loss=True,
        max_length=cfg.data.block_size,
        dataset_kwargs={"add_special_tokens": False},  # the prompts already hold the template's tokens
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    collate = trainer.data_collator

    def counting(features: list[dict]) -> dict:
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        return batch  # type: ignore[no-any-return]

    trainer.data_collator = counting
    trainer.train_dataset = trainer.train_dataset  # keep the dataloader built by train()
    trainer.add_callback(Timer())
    result = trainer.train()
    step_s = statistics.median(times[1:])
    return {
        "step_seconds": step_s,
        "tokens_per_step": statistics.mean(tokens[1 : len(times)]),
        "tokens_per_second": sum(tokens[1 : len(times)]) / sum(times[1:]),
        "loss": float(result.training_loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--rows", default="", help="only the fedtune rows whose name contains one of these (|-separated)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    from fedtune.config import load_config

    cfg = load_config(args.config)
    shard, tok, model_dir = client_data(cfg)
    peak = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    threads = torch.get_num_threads()
    print(f"GEMM peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s ({threads} threads)")
    rows: dict[str, dict] = {}
    plan = [
        ("fedtune fp32", False, "float32", False, "default"),
        ("fedtune bf16 autocast", True, "float32", False, "default"),
        ("fedtune bf16 base", True, "bfloat16", False, "default"),
        ("fedtune bf16 base, full head", True, "bfloat16", True, "default"),
        ("fedtune bf16 base, eager attention", True, "bfloat16", False, "eager"),
        ("fedtune bf16 base, grouped attention", True, "bfloat16", False, "grouped"),
        ("fedtune fp32, eager attention", False, "float32", False, "eager"),
        ("fedtune fp32, grouped attention", False, "float32", False, "grouped"),
        ("fedtune fp32, grouped attention, packed", False, "float32", False, "grouped", True),
        ("fedtune bf16 base, grouped attention, packed", True, "bfloat16", False, "grouped", True),
    ]
    wanted = [w for w in args.rows.split("|") if w]
    for name, bf16, base, full, attention, *packed in plan:
        if wanted and not any(w in name for w in wanted):
            continue
        kind = torch.bfloat16 if bf16 else torch.float32
        before = gemm_peak(kind)  # this machine's speed drifts: the peak is taken around each row
        rows[name] = fedtune_row(cfg, shard, model_dir, bf16, base, args.steps, full, attention, bool(packed))
        rows[name]["peak"] = "bf16" if bf16 else "fp32"
        rows[name]["peak_gflops"] = (before + gemm_peak(kind)) / 2
        print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}))
    if not args.no_trl:
        for name, bf16 in (("TRL SFTTrainer fp32", False), ("TRL SFTTrainer bf16", True)):
            rows[name] = trl_row(shard, tok, model_dir, cfg, bf16, args.steps)
            rows[name]["peak"] = "bf16" if bf16 else "fp32"
            print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}))
    print("\n| run | median s/step | real tokens/step | tokens/s | GFLOP/s (share of the GEMM peak) | mean loss |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        g = r.get("gflops_per_second")
        util = f"{g:.0f} ({100 * g / r['peak_gflops']:.0f} % of {r['peak']} {r['peak_gflops']:.0f})" if g else "n/a"
        if "step_peak_share" in r:
            shares = r["step_peak_share"]
            lo, mid, hi = (100 * f(shares) for f in (min, statistics.median, max))
            util += f"; per step {mid:.0f} % ({lo:.0f}-{hi:.0f})"
        print(
            f"| {name} | {r['step_seconds']:.3f} | {r['tokens_per_step']:.0f} | {r['tokens_per_second']:.0f} "
            f"| {util} | {r['loss']:.3f} |"
        )
    Path(args.out).write_text(json.dumps({"peak_gflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

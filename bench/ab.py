"""Interleaved A/B of one client's local bf16 step (configs/demo.yaml: SmolLM2-135M-Instruct, bf16
base, LoRA r=8 on q, v, batch 4): the same model, the same batches, two ways of computing the step.

  cast       old: torch.autocast alone (each PEFT LoRA layer casts its bf16 input to fp32 and
                  autocast casts it back); new: fedtune's `client.train.autocast(bf16, dev, model)`,
                  which also enters PEFT's disable_input_dtype_casting. Eager attention on both.
  attention  old: transformers' eager attention (the demo's kernel until session 11);
             new: `model.attention: grouped` (fedtune.models.attention). Both with fedtune's autocast.

    .venv/bin/python bench/ab.py cast --reps 2
    .venv/bin/python bench/ab.py attention --reps 2

The two paths alternate step by step over the same batches (this machine's speed drifts within
minutes, so back-to-back blocks would compare two machines); median seconds per step and mean loss.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["cast", "attention"])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from throughput import client_data

    from fedtune.client import train
    from fedtune.config import load_config
    from fedtune.engines.federation import build_adapted_model
    from fedtune.models import attention

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.dtype=bfloat16", "train.bf16=true"])  # its bf16 step
    mcfg = cfg.model.model_copy(update={"attention": "eager" if args.what == "cast" else attention.NAME})
    cfg = cfg.model_copy(update={"model": mcfg})
    shard, _, model_dir = client_data(cfg)
    model, _ = build_adapted_model(cfg, model_dir, {}, None)
    order = train.batch_indices(shard.num_examples, cfg.train.batch_size, torch.Generator().manual_seed(0))
    batches = [next(order) for _ in range(args.batches + 1)]
    new = train.autocast

    def old_cast(bf16: bool, device: torch.device | str = "cpu", model: object = None) -> object:
        return new(bf16, device)  # without the model: PEFT casts its inputs, as before

    def use(path: str) -> Callable[[], None]:
        if args.what == "cast":
            train.autocast = old_cast if path == "old" else new  # type: ignore[assignment]
            return lambda: setattr(train, "autocast", new)
        model.set_attn_implementation("eager" if path == "old" else attention.NAME)
        return lambda: None

    def step(path: str, b: torch.Tensor) -> tuple[float, float]:
        undo = use(path)
        try:
            t = time.perf_counter()
            loss = train.lm_loss(model, shard.train[b], True, mask=shard.train_mask[b])
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t, loss.item()
        finally:
            undo()

    step("old", batches[0])
    step("new", batches[0])  # warm-up
    out: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for _ in range(args.reps):
        for b in batches[1:]:
            for path in out:
                out[path].append(step(path, b))
    for path, rs in out.items():
        s, losses = statistics.median(r[0] for r in rs), statistics.mean(r[1] for r in rs)
        print(f"{path}: median {s:.3f} s/step over {len(rs)} steps, mean loss {losses:.4f}")
    print(f"new / old: {statistics.median(r[0] for r in out['new']) / statistics.median(r[0] for r in out['old']):.3f}")


if __name__ == "__main__":
    main()

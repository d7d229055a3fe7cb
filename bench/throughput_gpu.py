"""One client's local LoRA step on a GPU: fedtune vs a bare PyTorch + PEFT loop vs TRL's SFTTrainer,
in tokens/s and model FLOPs utilisation (issue #26 item 4). Prepared to run unchanged when a CUDA
machine is lent (bench/gpu_check.sh calls it); `--device cpu --shapes tiny` checks it here.

    python bench/throughput_gpu.py                          # cuda, SmolLM2-135M and 1B Llama shapes
    python bench/throughput_gpu.py --device cpu --shapes tiny --batch 2 --seq 64 --steps 3

Models are random-init (speed does not depend on the weights) of two shapes: SmolLM2-135M's config
and a 1B-parameter Llama (Llama-3.2-1B's config), bf16 frozen base, fp32 LoRA r=8 on q_proj and
v_proj, AdamW, bf16 autocast, batches of --batch x --seq random tokens with the loss on every token
(all three rows compute the same loss). Each row: median step time over --steps steps after two
warm-up steps. FLOPs: torch's FlopCounterMode over one forward + backward of that step, so only the
work actually done is counted (the frozen base gets activation gradients but no weight gradients).
Utilisation: those FLOPs / step time / the GPU's dense bf16 peak (a timed 8192-cube bf16 matmul, and
the vendor figure where the device name is known).
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
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}  # fmt: skip
VENDOR_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}  # dense, no sparsity


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device: torch.device, n: int) -> float:
    """Measured dense bf16 matmul rate (GFLOP/s)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e9


def base_model(shape: str, device: torch.device, seq: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).to(device=device, dtype=torch.bfloat16)
    return model.requires_grad_(False)


def lora_params(model: Any) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 master weights, as fedtune keeps them
    return params


def timed(step: Any, batches: list[torch.Tensor], device: torch.device, model: Any) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    times = []
    for i, batch in enumerate(batches):
        sync(device)
        t = time.perf_counter()
        loss = step(batch)
        sync(device)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(input_ids=batches[0], labels=batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    tokens = batches[0].numel()
    step_s = statistics.median(times)
    return {"step_seconds": step_s, "tokens_per_second": tokens / step_s, "flops_per_step": fc.get_total_flops(),
            "loss": float(loss)}  # fmt: skip


def bare_row(shape: str, batches: list[torch.Tensor], device: torch.device, seq: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        base_model(shape, device, seq), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    opt = torch.optim.AdamW(lora_params(model), lr=1e-4)
    model.train()

    def step(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return timed(step, batches, device, model)


def fedtune_row(shape: str, batches: list[torch.Tensor], device: torch.device, seq: int) -> dict[str, Any]:
    from fedtune.client.train import TrainData, TrainSpec, local_train_
    from fedtune.config.schema import LoraAdapterConfig
    from fedtune.models.adapters import inject_, lora_config

    model = inject_(base_model(shape, device, seq), lora_config(LoraAdapterConfig(r=8, alpha=16), "llama"), 0)
    params = lora_params(model)
    spec = TrainSpec(steps=1, batch_size=batches[0].shape[0], lr=1e-4, bf16=True, max_grad_norm=None)

    def step(batch: torch.Tensor) -> torch.Tensor:  # one local_train_ step on exactly this batch
        out = local_train_(model, params, TrainData(batch), spec, torch.Generator().manual_seed(0))
        return torch.tensor(out["train_loss"])

    return timed(step, batches, device, model)


def trl_row(shape: str, batches: list[torch.Tensor], device: torch.device, seq: int) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fedtune.config.schema import ModelConfig
    from fedtune.models.load import load_tokenizer, tiny_dir

    times: list[float] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync(device)
            times.append(time.perf_counter() - self.t)

    rows = [{"input_ids": r.tolist()} for b in batches for r in b.cpu()]  # already tokenized: no template
    args = SFTConfig(
        output_dir="/tmp/fedtune-trl-gpu",
        max_steps=len(batches),
        per_device_train_batch_size=batches[0].shape[0],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        bf16=True,
        use_cpu=device.type == "cpu",
        report_to=[],
        save_strategy="no",
        max_length=seq,
        packing=False,
        seed=0,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    model = base_model(shape, device, seq)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    # the rows are token ids already; the tokenizer only supplies pad/eos to TRL's collator
    tok = load_tokenizer(str(tiny_dir(ModelConfig(name="tiny"), 0)))
    data = datasets.Dataset.from_list(rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora, processing_class=tok)
    trainer.add_callback(Timer())
    result = trainer.train()
    step_s = statistics.median(times[2:])
    return {
        "step_seconds": step_s,
        "tokens_per_second": batches[0].numel() / step_s,
        "loss": float(result.training_loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2-135m,llama-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput_gpu.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured = gemm_peak(device, 8192 if device.type == "cuda" else 1024)
    vendor = next((v * 1e3 for k, v in VENDOR_BF16_TFLOPS.items() if k in name), None)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "gemm_bf16_gflops": measured,
                              "vendor_bf16_gflops": vendor, "batch": a.batch, "seq": a.seq, "rows": {}}  # fmt: skip
    for shape in a.shapes.split(","):
        g = torch.Generator().manual_seed(0)
        vocab = SHAPES[shape]["vocab_size"]
        batches = [torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(device) for _ in range(a.steps + 2)]
        rows = {"bare PyTorch + PEFT": bare_row, "fedtune": fedtune_row}
        if not a.no_trl:
            rows["TRL SFTTrainer"] = trl_row
        for label, row in rows.items():
            r = row(shape, batches, device, a.seq)
            flops = r.get("flops_per_step") or result["rows"].get(f"{shape} | fedtune", {}).get("flops_per_step")
            if flops:
                r["mfu_measured_peak"] = flops / r["step_seconds"] / (measured * 1e9)
                if vendor:
                    r["mfu_vendor_peak"] = flops / r["step_seconds"] / (vendor * 1e9)
            result["rows"][f"{shape} | {label}"] = r
            mfu = r.get("mfu_vendor_peak", r.get("mfu_measured_peak", float("nan")))
            tps, ms = r["tokens_per_second"], r["step_seconds"] * 1e3
            print(f"{shape:14s} {label:20s} {tps:12,.0f} tok/s  step {ms:8.1f} ms  MFU {mfu:.1%}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

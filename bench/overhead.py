"""Overhead of a fedtune client update vs a bare PyTorch + PEFT loop on the same model and batches.

    .venv/bin/python bench/overhead.py                 # SmolLM2-135M, LoRA q,v, bs 4 x 128, bf16
    .venv/bin/python bench/overhead.py --model tiny    # quick check

Both sides run the same number of optimizer steps on the same token blocks in the same order,
alternating (bare, fedtune, bare, fedtune, ...) so drift in machine speed hits both equally.
The fedtune side is the whole `run_client` (the path every engine runs): decode the downlink
payload, set the received adapter, train, read the state, compute the delta, encode the uplink,
and the server's decode, with the identity codec.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from fedtune.client.train import TrainSpec, batch_indices, lm_loss
    from fedtune.codecs.identity import Identity
    from fedtune.config.schema import LoraAdapterConfig, ModelConfig
    from fedtune.data.blocks import Shard
    from fedtune.models.adapters import get_state, inject_, lora_config, set_state_
    from fedtune.models.load import load_model, model_type, resolve_model_dir
    from fedtune.seeding import torch_generator

    mcfg = ModelConfig(name=args.model)
    model_dir = resolve_model_dir(mcfg, 0)
    model = load_model(model_dir, mcfg)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, vocab, (64, args.block_size), generator=gen)
    shard = Shard("c0", blocks, blocks[:0], blocks[:4], 64)
    spec = TrainSpec(steps=args.steps, batch_size=args.batch_size, lr=1e-3, bf16=args.bf16, max_grad_norm=1.0)

    model = inject_(model, lora_config(LoraAdapterConfig(), model_type(model_dir)), 0)
    init = get_state(model)
    codec = Identity()
    params = [p for p in model.parameters() if p.requires_grad]

    def bare() -> float:
        """What a user would write by hand: same batches (same generator), AdamW, clip, step."""
        set_state_(model, init)
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        stream = batch_indices(64, spec.batch_size, torch_generator(0, "train", 1, "c0"))
        model.train()
        t0 = time.perf_counter()
        for _ in range(spec.steps):
            loss = lm_loss(model, blocks[next(stream)], spec.bf16)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        return time.perf_counter() - t0

    from fedtune.client.run import ClientJob, ClientPlan, ClientState, run_client
    from fedtune.codecs import Chain

    plan = ClientPlan(spec=spec, seed=0, up_codec=Chain((codec,)), down_codec=Chain((codec,)))
    sent, _ = plan.down_codec.encode(init, None, torch_generator(0, "codec-down"))

    def fedtune() -> float:  # the one client path every engine runs: decode, train, encode, + server decode
        t0 = time.perf_counter()
        reply, _ = run_client(ClientJob(1, shard.client_id, sent), model, shard, plan, ClientState())
        plan.up_codec.decode(reply.payload, None)
        return time.perf_counter() - t0

    bare()  # warm-up
    fedtune()
    tb, tf = [], []
    for _ in range(args.repeats):
        tb.append(bare())
        tf.append(fedtune())
    mb, mf = statistics.median(tb), statistics.median(tf)
    print(
        f"model={args.model} steps={args.steps} bs={args.batch_size}x{args.block_size} bf16={args.bf16} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"bare PyTorch+PEFT: median {mb:.3f} s ({mb / args.steps:.3f} s/step) runs {[round(x, 3) for x in tb]}")
    print(f"fedtune client:    median {mf:.3f} s ({mf / args.steps:.3f} s/step) runs {[round(x, 3) for x in tf]}")
    print(f"ratio fedtune/bare: {mf / mb:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()

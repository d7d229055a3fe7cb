"""Why Ghost Noise Injection hurts SmolLM2 (BENCHMARKS "Ghost Noise Injection on the instruction
task"): the scale GNI divides each token by, sqrt((var_ghost + eps) / (var + eps)), measured on
the demo's first training batch at the output of every norm module of the base model.

    .venv/bin/python bench/ghost_scale.py                  # configs/demo.yaml, N = 8 and 32

For each ghost batch size N it draws the ghost batches as `client.ghost_noise.ghost_noise` does
(seeded) and reports, over all (token, feature) pairs of all norm outputs: quantiles of the scale,
the share below 0.1 (a token multiplied by more than 10), and the same with two token sets left
out of the statistics and of the draws: each row's first token (the attention sink of a
pretrained LLM, whose norm outputs are outliers) and the right padding. Also the features' batch
variance share carried by the first tokens, to name the mechanism with numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def norm_outputs(model: Any, batch: torch.Tensor) -> list[torch.Tensor]:
    """Every norm module's output [B, T, d] for one forward pass of `batch` (fp32, no grad)."""
    from fedtune.client.ghost_noise import _is_norm

    outs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: outs.append(out.detach().float()))
        for m in model.modules()
        if _is_norm(m)
    ]
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return outs


def scales(x: torch.Tensor, n_ghost: int, gen: torch.Generator, eps: float) -> torch.Tensor:
    """GNI's per-(token, feature) scale for rows `x` [n, d] (the same maths as ghost_noise)."""
    n = int(x.shape[0])
    idx = torch.randint(n, (n, n_ghost), generator=gen)
    var = x.var(0, correction=0)
    g_var = x[idx].var(1, correction=0)
    return torch.sqrt((g_var + eps) / (var + eps))


def loss_with(model: Any, batch: torch.Tensor, mask: torch.Tensor, where: list[Any], n_ghost: int, eps: float) -> float:
    """The batch's mean target loss with GNI (N = `n_ghost`, seeded) at the output of the norm
    modules `where` only (the modules in training mode there, the rest of the model as trained)."""
    from fedtune.client.ghost_noise import ghost_noise
    from fedtune.client.train import target_loss

    gen = torch.Generator().manual_seed(0)

    def hook(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
        return ghost_noise(out.reshape(-1, out.shape[-1]), n_ghost, gen, eps).reshape(out.shape)

    handles = [m.register_forward_hook(hook) for m in where]
    try:
        with torch.no_grad():
            total, n = target_loss(model, batch, mask, False)
    finally:
        for h in handles:
            h.remove()
    return float(total) / n


def summary(values: torch.Tensor) -> dict[str, float]:
    v = values.flatten()
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]  # quantile's limit
    q = torch.quantile(v, torch.tensor([0.01, 0.5, 0.99]))
    return {
        "min": float(values.min()),
        "p01": float(q[0]),
        "median": float(q[1]),
        "p99": float(q[2]),
        "max": float(values.max()),
        "below_0.1": float((v < 0.1).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--ghost", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    from fedtune.client.ghost_noise import _is_norm, ghost_noise
    from fedtune.client.train import batch_indices, trim_padding
    from fedtune.config import load_config
    from fedtune.engines.federation import build_adapted_model, load_shards
    from fedtune.models.load import load_tokenizer, resolve_model_dir

    cfg = load_config(args.config, ["model.dtype=float32", "train.bf16=false"])
    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    shards, _ = load_shards(cfg, load_tokenizer(model_dir))
    shard = shards[sorted(shards)[0]]
    rows = next(batch_indices(shard.num_examples, cfg.train.batch_size, torch.Generator().manual_seed(0)))
    batch, mask = trim_padding(shard.train[rows], shard.train_mask[rows])
    model, _ = build_adapted_model(cfg, model_dir, {}, None)
    model.eval()
    outs = norm_outputs(model, batch)
    b, t = batch.shape
    last = t - 1 - torch.flip(mask, dims=[1]).int().argmax(dim=1)  # each row's last target
    real = torch.arange(t)[None, :] <= last[:, None]  # not right padding
    first = torch.zeros(b, t, dtype=torch.bool)
    first[:, 0] = True
    keep = {
        "all tokens": torch.ones(b, t, dtype=torch.bool),
        "no padding": real,
        "no padding, no first token": real & ~first,
    }
    eps = 1e-3 if cfg.train.ghost_noise is None else cfg.train.ghost_noise.eps
    result: dict[str, Any] = {"batch": [b, t], "norm_modules": len(outs), "real_tokens": int(real.sum())}
    # the first tokens' share of each feature's variance (sum of squared deviations), median over features
    shares = []
    for o in outs:
        x = o[real]
        dev = (x - x.mean(0)).square()
        shares.append(dev[first[real]].sum(0) / dev.sum(0).clamp_min(1e-12))
    result["first_token_variance_share_median"] = float(torch.cat(shares).median())
    for n_ghost in args.ghost:
        for name, sel in keep.items():
            gen = torch.Generator().manual_seed(0)
            vals = torch.cat([scales(o[sel], n_ghost, gen, eps).flatten() for o in outs])
            result[f"N={n_ghost}, {name}"] = summary(vals)
    result["relative_change"] = {}
    result["loss"] = {"no noise": loss_with(model, batch, mask, [], 8, eps)}
    norms = [m for m in model.modules() if _is_norm(m)]
    for n_ghost in args.ghost:
        gen = torch.Generator().manual_seed(0)
        rel = torch.cat(
            [((ghost_noise(o[real], n_ghost, gen, eps) - o[real]).norm(dim=-1) / o[real].norm(dim=-1)) for o in outs]
        )
        result["relative_change"][f"N={n_ghost}"] = summary(rel)
        for name, where in {
            "every norm": norms,
            "the final norm only": norms[-1:],
            "the first layer's norms only": norms[:2],
            "the last layer's norms and the final norm": norms[-3:],
        }.items():
            result["loss"][f"N={n_ghost}, {name}"] = loss_with(model, batch, mask, where, n_ghost, eps)
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / "ghost_scale.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

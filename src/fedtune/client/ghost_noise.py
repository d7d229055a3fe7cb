"""Ghost Noise Injection (Kosson, Fan and Jaggi, arXiv:2305.17205): the noise that Ghost Batch
Normalization's small-batch statistics add, injected directly, so training gets the regularising
noise without evaluating on statistics from a different batch size.

Following the official implementation (github.com/epfml/ghost-noise,
`GhostNoiseInjectorR`): for each element b of a batch of n, draw a ghost batch of N indices
uniformly *with replacement*, take the ghost mean mu_b and variance var_b of those elements per
feature, and transform

    x_b' = (x_b - (mu_b - mu)) / sqrt((var_b + eps) / (var + eps))

with mu, var the statistics of the whole batch. The shift mu_b - mu has zero mean and variance
var / N per feature (the mean of N i.i.d. draws from the batch's empirical distribution).

On an RMSNorm network (the paper reports GNI also helps layer-normalized networks) fedtune
injects it at the output of every RMSNorm / LayerNorm module during local training, with the
tokens of the micro-batch as the batch (*chosen*: the paper's placement in layer-normalized
transformers could not be retrieved here; per-token statistics give a usable batch at the small
batch sizes of LLM fine-tuning). Modules in eval mode pass through unchanged, so evaluation and
export never see noise. Randomness comes from the injected generator only. `last` (config
`train.ghost_noise.last`) restricts it to the last k norm modules: on a frozen pretrained LLM the
noise at every norm compounds (BENCHMARKS.md, measured by `bench/ghost_scale.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

NORM_NAMES = ("RMSNorm", "LayerNorm")  # class-name suffixes of the normalisations it follows


def ghost_noise(x: torch.Tensor, ghost_batch: int, gen: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """GNI of `x` [n, d] (rows = batch elements, columns = features): each row shifted and scaled
    by the statistics of its own ghost batch of `ghost_batch` rows drawn with replacement."""
    n = int(x.shape[0])
    with torch.no_grad():
        xf = x.detach().float()
        idx = torch.randint(n, (n, ghost_batch), generator=gen).to(x.device)  # [n, N]
        mean, var = xf.mean(0), xf.var(0, correction=0)  # [d]
        ghost = xf[idx]  # [n, N, d]
        g_mean, g_var = ghost.mean(1), ghost.var(1, correction=0)  # [n, d]
        shift = (g_mean - mean).to(x.dtype)
        scale = torch.sqrt((g_var + eps) / (var + eps)).to(x.dtype)
    return (x - shift) / scale


def _is_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith(NORM_NAMES)


@contextlib.contextmanager
def ghost_noise_injected(
    model: Any, ghost_batch: int, gen: torch.Generator, eps: float = 1e-3, last: int | None = None
) -> Iterator[int]:
    """Inside the block, every norm module of `model` (or only the `last` ones, in module order)
    in training mode has GNI applied to its output (tokens of the batch as batch elements, padding
    included); yields how many modules. The hooks are removed on exit."""

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training or not isinstance(out, torch.Tensor):
            return None
        flat = out.reshape(-1, out.shape[-1])  # [B * T, d]
        return ghost_noise(flat, ghost_batch, gen, eps).reshape(out.shape)

    norms = [m for m in model.modules() if _is_norm(m)]
    handles = [m.register_forward_hook(hook) for m in (norms[-last:] if last else norms)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()

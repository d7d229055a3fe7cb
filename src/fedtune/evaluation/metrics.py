"""Held-out loss and perplexity per client, and the summaries across clients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.client.train import autocast


@torch.no_grad()
def evaluate_blocks(model: Any, blocks: torch.Tensor, batch_size: int, bf16: bool = False) -> dict[str, float]:
    """Token-weighted mean next-token loss over blocks [N, T]; ppl = exp(loss)."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for i in range(0, int(blocks.shape[0]), batch_size):
        batch = blocks[i : i + batch_size]
        with autocast(bf16):
            loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)  # predicted tokens
        total_loss += float(loss) * n
        total_tokens += n
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(total_tokens)}


def summarize(values: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """Mean, weighted mean and worst (max) over clients."""
    if not values:
        return {}
    total = sum(weights) or 1.0
    return {
        "mean": sum(values) / len(values),
        "weighted_mean": sum(v * w for v, w in zip(values, weights)) / total,
        "worst": max(values),
    }

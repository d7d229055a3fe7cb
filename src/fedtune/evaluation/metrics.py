"""Held-out loss and perplexity per client, and the summaries across clients."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtune.client.train import autocast, model_device, target_loss
from fedtune.config.schema import EvalConfig
from fedtune.data.chat import PromptSet


@torch.no_grad()
def evaluate_blocks(
    model: Any, blocks: torch.Tensor, batch_size: int, bf16: bool = False, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Token-weighted mean next-token loss over blocks [N, T] (only the `mask`ed target tokens,
    e.g. completions, when given); ppl = exp(loss)."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for i in range(0, int(blocks.shape[0]), batch_size):
        batch = blocks[i : i + batch_size]
        if mask is not None:
            summed, n = target_loss(model, batch, mask[i : i + batch_size], bf16)
            total_loss += float(summed)
        else:
            n = batch.shape[0] * (batch.shape[1] - 1)  # every token after the first is predicted
            dev = model_device(model)
            with autocast(bf16, dev, model):
                total_loss += float(model(input_ids=batch.to(dev), labels=batch.to(dev)).loss) * n
        total_tokens += n
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(total_tokens)}


def evaluate_split(
    model: Any,
    blocks: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: PromptSet | None,
    tokenizer: Any,
    ev: EvalConfig,
    bf16: bool,
) -> dict[str, Any]:
    """Everything scored on one split where its data is: loss / ppl on the target tokens, and on
    instruction data option accuracy, macro-F1, and exact match / ROUGE-L of greedy generations
    (plus one sample: `sample_prompt`, `sample_reference`, `sample_generation`)."""
    out: dict[str, Any] = dict(evaluate_blocks(model, blocks, ev.batch_size, bf16, mask))
    if prompts is None or not len(prompts):
        return out
    from fedtune.evaluation.tasks import choice_metrics, generation_metrics

    picked = prompts.take(ev.max_examples)
    out.update(choice_metrics(model, picked, bf16))
    if ev.generate > 0 and tokenizer is not None:
        scores, samples = generation_metrics(model, tokenizer, picked, ev.generate, ev.max_new_tokens, bf16)
        out.update(scores)
        if samples:
            out.update({f"sample_{k}": v for k, v in samples[0].items()})
    return out


TASK_METRICS = ("acc", "acc_norm", "macro_f1", "exact_match", "rouge_l")


def record_fields(prefix: str, r: Mapping[str, Any], tokens: bool = False, sample: bool = True) -> dict[str, Any]:
    """One `evaluate_split` result as record fields: {prefix}_loss, _ppl, the task metrics it
    has, {prefix}_tokens when `tokens`, and the generation sample as {prefix}_sample when
    `sample` (a party that keeps its generated text on its own node passes False)."""
    out: dict[str, Any] = {f"{prefix}_loss": r["loss"], f"{prefix}_ppl": r["ppl"]}
    if tokens:
        out[f"{prefix}_tokens"] = r["tokens"]
    out.update({f"{prefix}_{k}": r[k] for k in TASK_METRICS if k in r})
    if sample and "sample_generation" in r:
        out[f"{prefix}_sample"] = {k: r[f"sample_{k}"] for k in ("prompt", "reference", "generation")}
    return out


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

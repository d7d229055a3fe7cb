"""Task metrics on instruction data: multiple-choice / classification accuracy by the
log-likelihood of each option given the prompt (as lm-evaluation-harness scores `acc` and, divided
by the option's length in bytes, `acc_norm`), macro-F1, and greedy generation scored by exact match
and ROUGE-L (`rouge-score`, Google's reference implementation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.client.train import autocast, model_device
from fedtune.data.chat import PromptSet


@torch.no_grad()
def option_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    bf16: bool,
    batch_size: int = 8,
) -> list[list[float]]:
    """For each example, the sum of log p(option tokens | prompt) for each of its options.
    `batch_size` prompts run left-padded in one forward (attention mask and positions set so
    padding changes nothing), then all their options as one right-padded batch on the repeated
    key/value cache: two forwards per batch of examples, not per example (each forward re-casts
    the frozen weights under bf16 autocast)."""
    out: list[list[float]] = []
    dev = model_device(model)
    for start in range(0, len(prompts), batch_size):
        ps, opts = prompts[start : start + batch_size], options[start : start + batch_size]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in ps], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(bf16, dev, model):
            first_out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(first_out.logits[:, -1].float(), dim=-1)  # [B, V]
        k = max(len(o) for o in opts)
        longest = max(len(x) for o in opts for x in o)
        scores = [[float(first[b, x[0]]) for x in o] for b, o in enumerate(opts)]
        if longest > 1:
            cache = first_out.past_key_values
            cache.batch_repeat_interleave(k)
            rows, row_mask, row_pos = [], [], []
            for b, o in enumerate(opts):
                for j in range(k):
                    x = list(o[j][:-1]) if j < len(o) else []
                    rows.append(x + [0] * (longest - 1 - len(x)))
                    row_mask.append(mask[b].tolist() + [1] * (longest - 1))
                    row_pos.append([len(ps[b]) + i for i in range(longest - 1)])
            with autocast(bf16, dev, model):
                logits = model(
                    input_ids=torch.tensor(rows, device=dev),
                    attention_mask=torch.tensor(row_mask, device=dev),
                    position_ids=torch.tensor(row_pos, device=dev),
                    past_key_values=cache,
                    use_cache=True,
                ).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for b, o in enumerate(opts):
                for j, seq in enumerate(o):
                    scores[b][j] += sum(float(logp[b * k + j, i, seq[i + 1]]) for i in range(len(seq) - 1))
        out += scores
    return out


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean over the gold classes of F1 (a class never predicted nor present is ignored)."""
    classes = sorted(set(gold))
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def choice_metrics(model: Any, prompts: PromptSet, bf16: bool) -> dict[str, float]:
    """acc, acc_norm and macro_f1 over the examples that have options ({} when none has)."""
    gold, pred, pred_norm = [], [], []
    chosen = [i for i, o in enumerate(prompts.options) if o]
    all_scores = option_logprobs(
        model, [prompts.prompts[i] for i in chosen], [prompts.option_ids[i] for i in chosen], bf16
    )
    for i, scores in zip(chosen, all_scores):
        ref, opts = prompts.references[i], prompts.options[i]
        norm = [s / max(1, len(o.encode("utf-8"))) for s, o in zip(scores, opts)]
        gold.append(ref)
        pred.append(opts[max(range(len(opts)), key=scores.__getitem__)])
        pred_norm.append(opts[max(range(len(opts)), key=norm.__getitem__)])
    if not gold:
        return {}
    n = len(gold)
    return {
        "acc": sum(g == p for g, p in zip(gold, pred)) / n,
        "acc_norm": sum(g == p for g, p in zip(gold, pred_norm)) / n,
        "macro_f1": macro_f1(gold, pred),
        "choice_examples": float(n),
    }


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: Sequence[int], max_new_tokens: int, bf16: bool) -> str:
    """Greedy completion of one prompt, up to the end of the turn (EOS or the template's end token)."""
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if t is not None]
    stop = [t for t in stop if t != tokenizer.unk_token_id]
    dev = model_device(model)
    with autocast(bf16, dev, model):
        out = model.generate(
            input_ids=torch.tensor([list(prompt)], device=dev),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0] if stop else 0,
        )
    return str(tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)).strip()


def rouge_l(reference: str, prediction: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure)


def generation_metrics(
    model: Any, tokenizer: Any, prompts: PromptSet, n: int, max_new_tokens: int, bf16: bool
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Exact match and ROUGE-L of greedy generations on the first `n` prompts (the split is already
    a seeded shuffle), and the (prompt, reference, generation) samples."""
    picked = prompts.take(n)
    if not len(picked):
        return {}, []
    samples, em, rl = [], [], []
    for ids, ref in zip(picked.prompts, picked.references):
        text = generate(model, tokenizer, ids, max_new_tokens, bf16)
        em.append(float(text.strip().lower() == ref.strip().lower()))
        rl.append(rouge_l(ref, text))
        samples.append({"prompt": tokenizer.decode(ids[-200:]), "reference": ref, "generation": text})
    return {"exact_match": sum(em) / len(em), "rouge_l": sum(rl) / len(rl)}, samples

"""Federated GEM text embeddings (arXiv:2506.04344) on SmolLM2-135M-Instruct: does training the
shared adapter + GEM tokens with FedAvg give every party better retrieval than its base model or
training alone?

    .venv/bin/python bench/embedding.py                     # SmolLM2 (CPU: about 4 minutes; see below)
    .venv/bin/python bench/embedding.py --model tiny --out bench/out/embedding-smoke   # the script, in a minute

Task: chatterbot-corpus question -> answer pairs, one party per topic (food, history, science,
sports), each party's own question+answer text as its self-supervised training data, 2 rounds x
6 local GEM steps of batch 4 (one special token, ntp_weight 1, lr 2e-3, not tuned). Methods:
  - base mean-pooled: the untrained model, the mean of its final hidden states over the text
    (no training; the usual decoder baseline);
  - base GEM token: the untrained model with the (untrained) GEM token, i.e. round 0 of the runs;
  - GEM local-only: each party trains its own adapter + tokens (strategy local);
  - GEM FedAvg: the shared adapter + tokens (strategy fedavg).
Reported on each party's own test pairs (mean and worst party) and the pooled test pairs of all
parties: recall@1, MRR, nDCG@10, and 1-NN topic accuracy of the pooled answers, plus the
generation side (next-token loss of the test pairs). Writes OUT.md and OUT.json.

Cost on this project's 2-core CPU box (bf16 autocast): one GEM step of SmolLM2 at 4 x 64 tokens
takes about 1.2 s alone (two forward/backward passes: the GEM pass and the plain next-token
pass) and 10-16 s when the cores are shared; the whole script takes about 4 minutes alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runs import run_rows

CONFIG = "configs/tiny-embedding.yaml"
SMOLLM2 = [
    "model.name=smollm2",
    "model.dtype=auto",
    "model.attention=auto",
    "train.bf16=auto",
    "data.labels=[food,history,science,sports]",
    "data.max_docs_per_label=60",
    "data.block_size=64",
    "data.test_fraction=0.3",
    "rounds=2",
    "train.steps=6",
    "train.lr=0.002",
    "embedding.num_tokens=1",
    "embedding.ntp_weight=1.0",
    "evaluation.max_examples=16",
]
TINY = ["data.labels=[food,history,science,sports]", "rounds=2", "train.steps=2"]
METHODS = {"GEM local-only": ["strategy.name=local"], "GEM FedAvg": ["strategy.name=fedavg"]}
KEYS = ("mean_recall@1", "mean_mrr", "worst_mrr", "pooled_recall@1", "pooled_mrr", "pooled_ndcg@10")


def mean_pooled_baseline(config: str, common: list[str]) -> dict[str, float]:
    """Retrieval of the untrained base model's mean-pooled final hidden states, per party and pooled."""
    from fedtune.config import load_config
    from fedtune.embedding.gem import mean_pooled_ids
    from fedtune.embedding.parties import build_parties
    from fedtune.engines.federation import run_precision
    from fedtune.evaluation.retrieval import knn_accuracy, retrieval_metrics
    from fedtune.models.load import load_model, load_tokenizer, resolve_model_dir

    cfg, _, _ = run_precision(load_config(config, common))
    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    parties = build_parties(cfg, tokenizer, cfg.data.block_size - cfg.embedding.num_tokens)
    model = load_model(model_dir, cfg.model)
    per, all_q, all_d, labels = [], [], [], []
    for p in parties.values():
        q, d = mean_pooled_ids(model, p.query_ids), mean_pooled_ids(model, p.doc_ids)
        per.append(retrieval_metrics(q, d))
        all_q.append(q)
        all_d.append(d)
        labels += p.test.labels
    import torch

    pooled = retrieval_metrics(torch.cat(all_q), torch.cat(all_d))
    out = {f"pooled_{k}": v for k, v in pooled.items()}
    out["pooled_knn_topic_acc"] = knn_accuracy(torch.cat(all_d), labels)
    for k in ("recall@1", "mrr", "ndcg@10"):
        out[f"mean_{k}"] = sum(m[k] for m in per) / len(per)
        out[f"worst_{k}"] = min(m[k] for m in per)
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    cols = [*KEYS, "pooled_knn_topic_acc", "mean_lm_loss"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--out", default="bench/out/embedding")
    a = ap.parse_args()
    common = SMOLLM2 if a.model == "smollm2" else TINY
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_rows(METHODS, CONFIG, common, out)
    rows: dict[str, dict[str, Any]] = {"base mean-pooled": mean_pooled_baseline(CONFIG, common)}
    first = next(iter(runs.values()))["records"]
    rows["base GEM token (round 0)"] = next(r for r in first if r["client"] is None and r["round"] == 0)
    for name, res in runs.items():
        rows[name] = [r for r in res["records"] if r["client"] is None][-1]
    md = f"# GEM embeddings ({a.model})\n\n{table(rows)}\n"
    (out.with_suffix(".md")).write_text(md)
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()

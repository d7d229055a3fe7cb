"""Federated GEM text embeddings (arXiv:2506.04344) on SmolLM2-135M-Instruct: does training the
shared adapter + GEM tokens with FedAvg give every party better retrieval than its base model or
training alone?

    .venv/bin/python bench/embedding.py                     # SmolLM2 (CPU: about 4 minutes; see below)
    .venv/bin/python bench/embedding.py --model tiny --out bench/out/embedding-smoke   # the script, in a minute
    .venv/bin/python bench/embedding.py --instruction-examples 96    # + the demo's instruction task before / after
    .venv/bin/python bench/embedding.py --source stdlib-docstrings   # docstring -> code; or --source 20newsgroups

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
# --source: the other pair sets (`fedtune.data.pairs`), one party per label, SmolLM2 only.
# Their texts are longer than chatterbot's, so blocks of 128 tokens (a step costs about twice as much).
SOURCES = {
    "chatterbot": [],
    "stdlib-docstrings": [  # a function's docstring -> its code; one party per top-level package
        "data.source=stdlib-docstrings",
        "data.labels=[email,http,logging,xml]",
        "data.block_size=128",
    ],
    "20newsgroups": [  # a post's opening words (subject line and first words) -> the rest of the post
        "data.source=20newsgroups",
        "data.labels=[comp.graphics,rec.sport.hockey,sci.med,talk.politics.guns]",
        "data.max_chars_per_doc=600",
        "data.block_size=128",
    ],
}
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


def instruction_side(gem_run: Path, common: list[str], examples: int) -> dict[str, dict[str, float]]:
    """GEM's other claim, that generation is kept: the demo's instruction task (20 Newsgroups
    "which newsgroup?" by option likelihood, on the pooled class-balanced test prompts of its four
    parties) scored with the base model and with the GEM FedAvg run's LoRA (its special-token
    embeddings are not used by these prompts). The demo config with the GEM run's adapter shape."""
    from fedtune.config import load_config
    from fedtune.engines.inprocess import inprocess_federation
    from fedtune.models.adapters import get_state
    from fedtune.report import io

    gem_cfg = load_config(gem_run / "config.yaml")
    over = [
        f"adapter.r={gem_cfg.adapter.r}",
        f"adapter.alpha={gem_cfg.adapter.alpha}",
        f"evaluation.max_examples={examples}",
        f"output_dir={gem_run.parent / 'instruction-side'}",
        *[o for o in common if o.startswith("model.") or o.startswith("train.bf16")],
    ]
    fed = inprocess_federation(load_config("configs/demo.yaml", over))
    init = get_state(fed.model)
    trained = io.load_checkpoint(gem_run / io.CHECKPOINT)["global"]
    lora = {k: v for k, v in trained.items() if k in init}
    missing = sorted(set(init) - set(lora))
    if missing:
        raise SystemExit(f"the GEM run's adapter lacks {len(missing)} of the demo model's keys, e.g. {missing[0]}")
    first = fed.client_ids[0]  # the pooled test mixture is the same for every client: score it once
    keys = ("acc", "acc_norm", "macro_f1", "exact_match", "loss", "choice_examples")
    out = {}
    for name, state in (("base model", init), ("GEM FedAvg adapter", {**init, **lora})):
        r = fed.engine.evaluate({first: state}, split="ood")[first]
        out[name] = {k: float(r[k]) for k in keys if k in r}
        print(name, out[name], flush=True)
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
    ap.add_argument("--out", default=None, help="default bench/out/embedding (chatterbot), else embedding-SOURCE")
    ap.add_argument("--source", choices=list(SOURCES), default="chatterbot", help="the pairs (SmolLM2 only)")
    ap.add_argument(
        "--instruction-examples",
        type=int,
        default=0,
        help="also score the demo's instruction task on this many "
        "pooled test prompts with the base model and the GEM FedAvg adapter (SmolLM2 only; 0: skip)",
    )
    a = ap.parse_args()
    if a.source != "chatterbot" and a.model != "smollm2":
        raise SystemExit("--source other than chatterbot is for --model smollm2")
    common = [*SMOLLM2, *SOURCES[a.source]] if a.model == "smollm2" else TINY
    out = Path(a.out or ("bench/out/embedding" if a.source == "chatterbot" else f"bench/out/embedding-{a.source}"))
    out.mkdir(parents=True, exist_ok=True)
    runs = run_rows(METHODS, CONFIG, common, out)
    rows: dict[str, dict[str, Any]] = {"base mean-pooled": mean_pooled_baseline(CONFIG, common)}
    first = next(iter(runs.values()))["records"]
    rows["base GEM token (round 0)"] = next(r for r in first if r["client"] is None and r["round"] == 0)
    for name, res in runs.items():
        rows[name] = [r for r in res["records"] if r["client"] is None][-1]
    md = f"# GEM embeddings ({a.model}, {a.source})\n\n{table(rows)}\n"
    if a.instruction_examples and a.model == "smollm2":
        side = instruction_side(out / "GEM_FedAvg", common, a.instruction_examples)
        md += "\n| instruction task (demo, pooled test) | acc | acc_norm | macro-F1 | exact match | loss | prompts |\n"
        md += "|---|---|---|---|---|---|---|\n"
        for name, r in side.items():
            cells = [f"{r.get(k, float('nan')):.3f}" for k in ("acc", "acc_norm", "macro_f1", "exact_match", "loss")]
            md += f"| {name} | " + " | ".join(cells) + f" | {r.get('choice_examples', 0):.0f} |\n"
        rows["instruction side"] = side
    (out.with_suffix(".md")).write_text(md)
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()

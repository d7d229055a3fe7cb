"""Instruction tuning end to end on the tiny model: a folder of chat files per client, loss on the
answers, accuracy / F1 / exact match in the records, the merged export equal to the adapter, and
`fedtune generate` through the chat template."""

import json
from pathlib import Path

import pytest
import torch

from conftest import COLORS, ROOT, chat_data, chat_folder, run_cli


def chat_run(data: Path, out: Path) -> list[str]:
    """Overrides of configs/tiny.yaml for one round on `chat_folder`'s data, every task metric on."""
    return [
        *chat_data(data, 96, 0.3),
        "rounds=1",
        "evaluation.ood=true",
        "evaluation.max_examples=4",
        "evaluation.generate=2",
        "evaluation.max_new_tokens=3",
        f"output_dir={out}",
    ]


# the module-scoped runs below are made once: under pytest-xdist every worker that takes one of
# this module's tests would otherwise make them again
pytestmark = pytest.mark.xdist_group("instruct-runs")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    tmp = tmp_path_factory.mktemp("instruct")
    data = chat_folder(tmp / "data")
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [*chat_run(data, tmp / "run"), "train.steps=3", "train.dp_sgd.noise_multiplier=1.0"],
    )
    run_federated(cfg, overwrite=True, progress=False)
    return tmp / "run"


def test_records_carry_task_metrics_and_the_template(run) -> None:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    r0 = next(r for r in recs if r["client"] is None and r["round"] == 0)
    assert r0["data_chat_template"] == "model" and r0["data_loss_on"] == "completion tokens"
    last = [r for r in recs if r["client"] and r["round"] == 1]
    assert {r["client"] for r in last} == {"north", "south"}
    for r in last:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0 and "test_macro_f1" in r
        assert 0.0 <= r["test_exact_match"] <= 1.0 and r["test_sample"]["reference"] in COLORS.values()
        assert r["test_tokens"] > 0
    summary = next(r for r in recs if r["client"] is None and r["round"] == 1)
    assert summary["mean_acc"] == pytest.approx(sum(r["test_acc"] for r in last) / 2)
    assert summary["worst_acc"] == min(r["test_acc"] for r in last)
    # DP-SGD on chat data: the unit of privacy is one example (a whole conversation row)
    assert (
        summary["sample_dp_unit"].startswith("example: one instruction / chat example")
        and summary["sample_epsilon"] > 0
    )


def test_merged_export_equals_the_adapter_and_generate_runs(run) -> None:
    from transformers import AutoModelForCausalLM

    from fedtune.models.export import export_merged, load_exported

    peft_model, _ = load_exported(run)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(run)).eval()
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():  # the adapter really changed the model
        assert (peft_model(input_ids=ids).logits - a).abs().max() > 1e-4
    r = run_cli("generate", str(run), "what colour is the sky?", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr


LM_EVAL_TASK = """task: colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_on_a_local_task_scores_the_adapter_as_fedtune_does(run, tmp_path) -> None:
    pytest.importorskip("lm_eval")
    from fedtune.evaluation.tasks import option_logprobs
    from fedtune.models.export import load_exported

    choices = sorted(COLORS.values())
    docs = [
        {"question": f"what colour is the {t}?", "choices": choices, "answer": choices.index(c)}
        for t, c in COLORS.items()
    ]
    (tmp_path / "colours.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "colours.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "colours.jsonl"))

    r = run_cli("eval", str(run), "--tasks", "colours", "--include", str(tasks))
    assert r.returncode == 0, r.stderr
    saved = json.loads((run / "eval" / "harness.json").read_text())
    samples = saved["samples"]["colours"]
    assert len(samples) == len(docs)
    # the reference: fedtune's own option scoring of the same prompt + " option" byte tokens
    model, tok = load_exported(run)
    ours = option_logprobs(
        model,
        [tok(f"Q: {d['question']}\nA:", add_special_tokens=False)["input_ids"] for d in docs],
        [[tok(" " + c, add_special_tokens=False)["input_ids"] for c in choices] for _ in docs],
        False,
    )
    for s, mine in zip(sorted(samples, key=lambda s: s["doc_id"]), ours):
        theirs = [float(x[0]) for x in s["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-3)
    acc = sum(max(range(4), key=lambda j: o[j]) == d["answer"] for o, d in zip(ours, docs)) / len(docs)
    assert saved["results"]["colours"]["acc,none"] == pytest.approx(acc)
    assert "colours" in r.stdout and "acc" in r.stdout


def test_trust_distill_parties_are_scored_with_the_task_metrics(tmp_path) -> None:
    """A trust_distill party on instruction data gets the federated loop's task metrics (accuracy,
    macro-F1, exact match on its own test prompts, and on the pooled mixture), not only perplexity;
    the generated text stays on the party (no sample in the records)."""
    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    data = chat_folder(tmp_path / "data")
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *chat_run(data, tmp_path / "run"),
            "strategy.name=trust_distill",
            'strategy.parties=[{}, {"layers": 1}]',
            "strategy.public_blocks=2",
            "train.steps=2",
        ],
    )
    recs = run_federated(cfg, overwrite=True, progress=False).records
    for rnd in (0, 1):
        parties = [r for r in recs if r["client"] and r["round"] == rnd]
        assert {r["client"] for r in parties} == {"north", "south"}
        for r in parties:
            assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0 and "test_macro_f1" in r
            assert 0.0 <= r["test_exact_match"] <= 1.0 and "test_sample" not in r
            assert r["test_tokens"] > 0

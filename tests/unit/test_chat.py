"""Instruction / chat data: the model's chat template, loss only on assistant tokens, errors that
name the row and field, option-likelihood accuracy and generation metrics against hand values."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedtune.config.schema import DataConfig
from fedtune.data.chat import PromptSet, Renderer, encode_examples, prompt_set
from fedtune.errors import DataError
from fedtune.models.load import byte_tokenizer

CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# the tiny model's template (ChatML), written out by hand: what the model must see
RENDERED = (
    "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
)


def test_the_model_template_renders_and_only_assistant_tokens_are_targets() -> None:
    tok = byte_tokenizer()  # one token per byte: token i is character i
    r = Renderer(tok)
    assert r.template == "model" and r.text(CONV, False) == RENDERED
    ids, mask = r.example(CONV, "completion")
    assert tok.decode(ids) == RENDERED
    want = [False] * len(RENDERED)
    for answer in ("hello<|im_end|>\n", "4<|im_end|>\n"):  # every assistant turn, end of turn included
        start = RENDERED.index("assistant\n" + answer) + len("assistant\n")
        want[start : start + len(answer)] = [True] * len(answer)
    assert mask == want
    x, m, counts = encode_examples([CONV], r, len(RENDERED) + 7, "completion")
    labels = x.masked_fill(~m, -100)[0]
    assert labels[len(RENDERED) :].eq(-100).all()  # padding
    assert [i for i, v in enumerate(labels.tolist()) if v != -100] == [i for i, w in enumerate(want) if w]
    assert counts == {
        "examples_truncated": 0,
        "examples_dropped": 0,
        "tokens": len(RENDERED),
        "target_tokens": 16 + 12,
        "tokens_cut": 0,
    }
    _, m_all, _ = encode_examples([CONV], r, len(RENDERED), "all")
    assert bool(m_all.all())


def test_long_examples_lose_the_prompt_start_and_are_counted() -> None:
    r = Renderer(byte_tokenizer())
    x, m, counts = encode_examples([CONV], r, 40, "completion")
    assert counts["examples_truncated"] == 1 and x.shape == (1, 40)
    assert byte_tokenizer().decode(x[0].tolist()) == RENDERED[-40:]  # the end (the answer) kept


def test_a_tokenizer_without_template_uses_the_plain_rendering_and_says_so() -> None:
    tok = byte_tokenizer()
    tok.chat_template = None
    r = Renderer(tok)
    assert r.template == "plain"
    assert r.text(CONV[1:3], False) == "user: hi\nassistant: hello<|endoftext|>\n"
    ids, mask = r.example(CONV[1:3], "completion")
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "hello<|endoftext|>\n"


def _jsonl(tmp_path: Path, rows: list[dict[str, object]], name: str = "a.jsonl") -> Path:
    d = tmp_path / "data" / "c0"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("fmt", "row", "expect"),
    [
        ("prompt_completion", {"prompt": "q"}, "row 2: field 'completion' is empty"),
        ("prompt_completion", {"prompt": "q", "completion": "  "}, "row 2: field 'completion' is empty"),
        ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "row 2: messages[0].role = 'bot'"),
        ("messages", {"messages": [{"role": "user", "content": "x"}]}, "row 2: the conversation ends with a 'user'"),
        ("alpaca", {"instruction": "do", "output": ""}, "row 2: field 'output' is empty"),
        ("prompt_completion", {"prompt": "q", "completion": "c", "options": ["a", "b"]}, "row 2: the completion 'c'"),
    ],
)
def test_bad_rows_are_errors_naming_file_row_and_field(tmp_path, fmt, row, expect) -> None:
    from fedtune.data.sources import load_corpus

    good = {
        "prompt_completion": {"prompt": "q", "completion": "a"},
        "messages": {"messages": CONV},
        "alpaca": {"instruction": "do", "output": "done"},
    }[fmt]
    root = _jsonl(tmp_path, [good, row])
    with pytest.raises(DataError) as e:
        load_corpus(DataConfig(source="files", path=str(root), format=fmt))
    assert expect in str(e.value) and "a.jsonl" in str(e.value)


def test_renamed_columns_and_alpaca_input(tmp_path) -> None:
    from fedtune.data.sources import load_corpus

    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(3)]
    ds = load_corpus(
        DataConfig(
            source="files",
            path=str(_jsonl(tmp_path, rows)),
            format="prompt_completion",
            columns={"prompt": "q", "completion": "a"},
        )
    )
    assert json.loads(ds["messages"][1])[-1] == {"role": "assistant", "content": "answer 1"}
    root = _jsonl(tmp_path / "b", [{"instruction": "sum", "input": "1 2", "output": "3"}] * 2)
    ds = load_corpus(DataConfig(source="files", path=str(root), format="alpaca"))
    assert json.loads(ds["messages"][0])[0]["content"] == "sum\n\n1 2"
    root = _jsonl(tmp_path / "c", [{"question": "q", "answer": "a"}] * 2)
    with pytest.raises(DataError, match=r"a.jsonl row 1: no column 'prompt', 'completion'.*rename with data.columns"):
        load_corpus(DataConfig(source="files", path=str(root), format="prompt_completion"))


def test_option_likelihood_accuracy_equals_a_hand_computation(tiny_with_lora) -> None:
    from fedtune.evaluation.tasks import choice_metrics, option_logprobs

    model, _ = tiny_with_lora()
    model.eval()
    r = Renderer(byte_tokenizer())
    convs = [
        [{"role": "user", "content": f"pick {i}"}, {"role": "assistant", "content": ["yes", "no"][i % 2]}]
        for i in range(4)
    ]
    ps = prompt_set(convs, [["yes", "no"]] * 4, r, 64)

    def by_hand(p: list[int], opts: list[list[int]]) -> list[float]:
        """One full forward of prompt + option: the sum of the option tokens' log-probabilities."""
        scores = []
        for o in opts:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
            scores.append(sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(o)))
        return scores

    hand = [by_hand(p, opts) for p, opts in zip(ps.prompts, ps.option_ids)]
    for got_scores, scores in zip(option_logprobs(model, ps.prompts, ps.option_ids, False), hand):
        assert got_scores == pytest.approx(scores, abs=1e-4)
    # batched with left-padded prompts of different lengths, options on the repeated cache
    ragged = [p[i:] for i, p in enumerate(ps.prompts)]
    batched = option_logprobs(model, ragged, ps.option_ids, False, batch_size=3)
    for p, opts, got_scores in zip(ragged, ps.option_ids, batched):
        assert got_scores == pytest.approx(by_hand(p, opts), abs=1e-4)
    pred = [["yes", "no"][max(range(2), key=s.__getitem__)] for s in hand]
    norm = [["yes", "no"][max(range(2), key=lambda j: s[j] / len(["yes", "no"][j]))] for s in hand]
    got = choice_metrics(model, ps, False)
    assert got["acc"] == sum(p == g for p, g in zip(pred, ps.references)) / 4
    assert got["acc_norm"] == sum(p == g for p, g in zip(norm, ps.references)) / 4


def test_macro_f1_rouge_l_and_balancing_by_hand() -> None:
    from fedtune.evaluation.tasks import macro_f1, rouge_l

    # a: tp 1, fp 2, fn 1 -> F1 2/5; b: tp 1, fp 1, fn 1 -> 1/2; c: tp 0, fn 1 -> 0
    assert macro_f1(["a", "a", "b", "b", "c"], ["a", "b", "b", "a", "a"]) == pytest.approx((0.4 + 0.5 + 0.0) / 3)
    # LCS("the cat sat", "the cat") = 2: P = 1, R = 2/3, F = 0.8
    assert rouge_l("the cat sat", "the cat") == pytest.approx(0.8)
    ps = PromptSet([[1], [2], [3], [4], [5]], ["a", "a", "a", "b", "b"], [["a", "b"]] * 5, [[[1], [2]]] * 5)
    assert ps.balanced().references == ["a", "b", "a", "b"]


def test_generation_metrics_count_exact_matches() -> None:
    from fedtune.evaluation import tasks

    tok = byte_tokenizer()

    class Echo(torch.nn.Module):  # greedy "generation" of a fixed continuation
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kw):
            return torch.cat([input_ids, torch.tensor([tok("ok")["input_ids"]])], dim=1)

    ps = PromptSet([[104, 105], [104, 105]], ["ok", "OK "], [[], []], [[], []])
    scores, samples = tasks.generation_metrics(Echo(), tok, ps, 2, 4, False)
    assert scores == {"exact_match": 1.0, "rouge_l": 1.0} and samples[0]["generation"] == "ok"
    ps = PromptSet([[104]], ["no way"], [[]], [[]])
    assert tasks.generation_metrics(Echo(), tok, ps, 1, 4, False)[0] == {"exact_match": 0.0, "rouge_l": 0.0}


def test_near_duplicates_never_straddle_splits_on_20_newsgroups() -> None:
    from fedtune.data.dedup import groups, overlap, split_order
    from fedtune.data.sources import load_corpus

    ds = load_corpus(DataConfig(source="20newsgroups", labels=["sci.med"], max_docs_per_label=150))
    texts = list(ds["text"])
    g = torch.Generator().manual_seed(0)
    plain = split_order(len(texts), 0.1, 0.15, g)
    grouped = split_order(len(texts), 0.1, 0.15, torch.Generator().manual_seed(0), groups(texts))

    def pick(idx: list[int]) -> list[str]:
        return [texts[i] for i in idx]

    before = overlap(pick(plain[0]), pick(plain[2]))
    after = overlap(pick(grouped[0]), pick(grouped[2])), overlap(pick(grouped[0]), pick(grouped[1]))
    assert before > 0.02 and max(after) < 0.02, (before, after)
    assert sorted(sum(grouped, [])) == list(range(len(texts)))  # every document used, once
    assert len(grouped[2]) >= 1 and math.isclose(len(grouped[2]), 0.15 * len(texts), abs_tol=8)


def test_raw_text_splits_are_deduplicated_by_default() -> None:
    """Raw text too (the landed default was off for it: 10-29 % of a 20 Newsgroups client's test
    shingles were in its own training split, inflating every perplexity gain measured on it)."""
    from fedtune.data.dedup import overlap
    from fedtune.data.shards import ClientShards, Corpus
    from fedtune.data.sources import load_corpus

    cfg = DataConfig(source="20newsgroups", labels=["sci.med"], max_docs_per_label=150)
    ds = load_corpus(cfg)
    texts = list(ds["text"])
    shards = ClientShards({"c": list(range(len(texts)))}, Corpus.of(ds), byte_tokenizer(), cfg, seed=0)
    train, _, test = shards._order("c")
    assert overlap([texts[i] for i in train], [texts[i] for i in test]) < 0.02


def test_dropping_trailing_pad_columns_leaves_the_loss_unchanged(tiny_with_lora) -> None:
    from fedtune.client.train import lm_loss

    model, _ = tiny_with_lora()
    model.eval()
    r = Renderer(byte_tokenizer())
    x, m, _ = encode_examples([CONV, CONV[1:3]], r, len(RENDERED) + 30, "completion")
    with torch.no_grad():
        full = model(input_ids=x, labels=x.masked_fill(~m, -100)).loss
        assert float(lm_loss(model, x, False, mask=m)) == pytest.approx(float(full), abs=1e-5)


def test_chitchat_gives_one_valid_chat_per_conversation_and_speaker() -> None:
    from fedtune.data.chat import check_messages
    from fedtune.data.sources import load_corpus

    ds = load_corpus(DataConfig(source="chitchat", labels=["speaker-0001", "speaker-0002"], max_docs_per_label=20))
    assert sorted(set(ds["label"])) == ["speaker-0001", "speaker-0002"] and len(ds) == 40
    for m in ds["messages"]:
        conv = check_messages(m, "chitchat")  # raises unless roles alternate validly, ending with the assistant
        assert conv[0]["role"] == "user" and conv[-1]["role"] == "assistant"

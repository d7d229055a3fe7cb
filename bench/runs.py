"""Shared by the benchmark scripts: run named rows of overrides on a config, each into its own
run directory (a finished row is reused), and read back records and summaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_rows(
    rows: dict[str, list[str]], config: str, common: list[str], out: Path, only_finished: bool = False
) -> dict[str, dict[str, Any]]:
    """Run each row not yet finished in `out` (`only_finished`: run nothing, return what is there)."""
    import datasets
    from transformers.utils import logging as hf_logging

    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    results = {}
    for row, over in rows.items():
        d = out / "".join(c if c.isalnum() else "_" for c in row)
        cfg = load_config(config, [*common, *over, f"output_dir={d}", f"name={row}"])
        if not (d / "summary.json").exists():
            if only_finished:
                continue
            run_federated(cfg, overwrite=True, progress=False)
        elif changed := config_changes(load_config(d / "config.yaml"), cfg):
            raise SystemExit(
                f"{d} was run with another config than {config} now gives ({'; '.join(changed)}): "
                f"delete {d} to run it again, or pass the old values"
            )
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        results[row] = {"records": recs, "summary": json.loads((d / "summary.json").read_text())}
        print(row, results[row]["summary"]["final"].get("mean_ppl"), flush=True)
    return results


def config_changes(done: Any, now: Any) -> list[str]:
    """The settings (dotted keys) in which a finished run's config differs from today's, apart from
    `output_dir` (a finished row may have been moved)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}

    a, b = flat(done.model_dump(mode="json")), flat(now.model_dump(mode="json"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "output_dir.")
    return [f"{k[:-1]}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def final(result: dict[str, Any], key: str = "mean_ppl") -> Any:
    return result["summary"]["final"].get(key)

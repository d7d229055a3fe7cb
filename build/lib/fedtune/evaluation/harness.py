"""`fedtune eval RUN_DIR --tasks ...`: lm-evaluation-harness (extra `fedtune[eval]`) on a run's
exported model, the PEFT adapter loaded in memory on its base (nothing merged or written), for
users with MMLU-style task sets on disk (`--include DIR` of task YAML files).

lm-eval scores multiple-choice tasks the same way fedtune's in-loop accuracy does (the summed
log-likelihood of each option after the prompt; acc_norm divides by the option's length in
bytes), so the two agree on the same examples (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError


def harness_eval(
    run_dir: Path,
    tasks: Sequence[str],
    *,
    include: Path | None = None,
    client: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    chat_template: bool = False,
) -> dict[str, Any]:
    """lm-eval's results dict for `tasks` on the run's global (or `client`'s personal) model;
    per-example records under results["samples"]. Also written to RUN_DIR/eval/harness.json."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FedtuneError("fedtune eval --tasks needs lm-evaluation-harness: pip install 'fedtune[eval]'") from None
    if include is not None and not Path(include).is_dir():
        raise FedtuneError(f"--include {include}: not a directory of lm-eval task YAML files")
    from fedtune.models.export import load_exported

    model, tokenizer = load_exported(run_dir, client)
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FedtuneError(
            f"unknown lm-eval task(s) {unknown}; give their YAML folder with --include "
            "(no task is downloaded: datasets must be on disk)"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=True,
        apply_chat_template=chat_template,
        bootstrap_iters=0,
    )
    if results is None:
        raise FedtuneError("lm-eval returned no results")
    _write(Path(run_dir), client, results)
    return dict(results)


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(task, metric, value) for every numeric metric lm-eval reports (its stderr fields excluded)."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in sorted(metrics.items()):
            if isinstance(value, int | float) and not isinstance(value, bool) and "_stderr" not in key:
                rows.append((task, key.split(",")[0], float(value)))
    return rows


def _write(run_dir: Path, client: str | None, results: dict[str, Any]) -> None:
    import json

    from fedtune.files import write_atomic

    keep = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "samples") if k in results}
    name = "harness.json" if client is None else f"harness-{client.replace('/', '_')}.json"
    (run_dir / "eval").mkdir(exist_ok=True)
    write_atomic(run_dir / "eval" / name, json.dumps(keep, indent=1, sort_keys=True, default=str))

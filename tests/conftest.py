from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch a user's cache: the tiny model (and any fetched wheel) live in a test cache.
os.environ.setdefault("FEDTUNE_CACHE", str(Path(tempfile.gettempdir()) / "fedtune-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _quiet_progress_bars() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """The shipped tiny config with its output in tmp_path; pass overrides as key=value strings."""
    from fedtune.config import load_config

    def make(*overrides: str, name: str = "t"):
        return load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path / name}", *overrides])

    return make


class Interrupt(Exception):
    """Raised after a chosen round to simulate a run that was killed there."""


@pytest.fixture
def interrupt_after():
    """Run `cfg` in-process and stop it right after round `rnd` was checkpointed."""
    from fedtune.recipes.federated import run_federated

    def run(cfg, rnd: int) -> None:
        def stop(r: int) -> None:
            if r == rnd:
                raise Interrupt

        with pytest.raises(Interrupt):
            run_federated(cfg, progress=False, after_round=stop)

    return run


@pytest.fixture
def no_time():
    """Metric records without wall-clock fields (the only values that differ between runs)."""
    return lambda records: [{k: v for k, v in r.items() if "seconds" not in k} for r in records]

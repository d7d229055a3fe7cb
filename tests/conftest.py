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

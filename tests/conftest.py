from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch a user's cache: the tiny model (and any fetched wheel) live in a test cache.
os.environ.setdefault("FEDTUNE_CACHE", str(Path(tempfile.gettempdir()) / "fedtune-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: `make test` runs 2 workers on 2 cores, and every run a test
# starts (CLI, Ray and Flower processes, peers) inherits this; two-thread pools on each of them
# oversubscribe the cores, and the tiny models' small ops then spin-wait (a run took 1.9x longer).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black"}


def chat_folder(
    root: Path, n: int = 14, prefix: Any = lambda i: f"Case {i}: ", system: str | None = "Answer with one word."
) -> Path:
    """Two clients' chat files (JSONL, messages format, with options); each asks about the colour
    of things: `n` rows, the user turn `prefix(i)` + the question, after an optional system turn."""
    import json

    for c, things in {"north": ["sky", "snow"], "south": ["grass", "coal"]}.items():
        d = root / c
        d.mkdir(parents=True)
        rows = []
        for i in range(n):
            thing = things[i % 2]
            msgs = [] if system is None else [{"role": "system", "content": system}]
            msgs += [
                {"role": "user", "content": f"{prefix(i)}what colour is the {thing}?"},
                {"role": "assistant", "content": COLORS[thing]},
            ]
            rows.append({"messages": msgs, "options": sorted(COLORS.values())})
        (d / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def chat_data(data: Path, block_size: int, test_fraction: float) -> list[str]:
    """Overrides of configs/tiny.yaml that read `chat_folder`'s files whole."""
    return [
        "data.source=files",
        f"data.path={data}",
        "data.format=messages",
        "data.max_chars_per_doc=null",
        "data.max_docs_per_label=null",
        "data.labels=null",
        f"data.block_size={block_size}",
        f"data.test_fraction={test_fraction}",
    ]


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


@pytest.fixture
def tiny_with_lora():
    """A factory: (tiny llama with a rank-2 LoRA on q, v; its initial adapter state)."""

    def make():
        from fedtune.config.schema import LoraAdapterConfig, ModelConfig
        from fedtune.models.adapters import get_state, inject_, lora_config
        from fedtune.models.load import load_model, tiny_dir

        mcfg = ModelConfig(name="tiny")
        lora = lora_config(LoraAdapterConfig(r=2, alpha=4), "llama")
        model = inject_(load_model(str(tiny_dir(mcfg, 0)), mcfg), lora, 0)
        return model, get_state(model)

    return make


@pytest.fixture
def random_shard():
    """A factory: a client shard of 12 random token blocks (seeded by the client id)."""

    def make(cid: str):
        import torch

        from fedtune.data.blocks import Shard

        g = torch.Generator().manual_seed(len(cid))
        blocks = torch.randint(0, 300, (12, 16), generator=g)
        return Shard(cid, blocks, blocks[:2], blocks[:2], 3)

    return make


def run_cli(*args: str):
    """`fedtune ARGS` in a fresh process (as a user runs it), from the repository root."""
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.fixture(scope="session")
def fresh_cli(tmp_path_factory):
    """A factory: `fedtune ARGS` in a fresh process forked from a server that has only imported
    the CLI (tests/forkserver.py), so each call skips ~8 s of imports; returns a CompletedProcess.
    For tests that want a process that never ran a run (a resume from disk alone); run_cli is
    for tests of what a user sees from a cold start."""
    import itertools
    import json
    import select
    import signal
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "forkserver.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert server.stdout is not None and server.stdin is not None
    assert server.stdout.readline().strip() == "ready", "the fork server did not start"
    out_dir = tmp_path_factory.mktemp("fresh-cli")
    calls = itertools.count()

    def reply(timeout: float) -> dict:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the fork server within {timeout} s")
        line = server.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def run(*args: str, timeout: float = 900):
        i = next(calls)
        out, err = out_dir / f"{i}.out", out_dir / f"{i}.err"
        req = {"args": list(args), "env": env, "stdout": str(out), "stderr": str(err)}
        assert server.stdin is not None
        server.stdin.write(json.dumps(req) + "\n")
        server.stdin.flush()
        pid = reply(60)["pid"]
        try:
            rc = reply(timeout)["rc"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            reply(60)  # the killed child's exit code: the server is ready for the next call
            raise
        return subprocess.CompletedProcess(["fedtune", *args], rc, out.read_text(), err.read_text())

    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.fixture(scope="session")
def cli():
    """A factory: run the fedtune CLI in a subprocess; returns the CompletedProcess."""
    return run_cli


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs 2 workers), the Flower tests run one after another on
    one worker: they start SuperLinks on fixed ports and Ray clusters, and two at once would
    compete for both; everything else spreads over the workers. Tests marked `gpu` run wherever
    torch sees a CUDA GPU and are skipped (saying why) elsewhere; `-m gpu` selects them."""
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if item.get_closest_marker("flower"):
            item.add_marker(pytest.mark.xdist_group("flower"))
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)

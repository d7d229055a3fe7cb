"""`fedtune ARGS` in a fresh process, without paying the imports each time (tests only).

Started once per pytest worker (the `fresh_cli` fixture in conftest.py): it imports fedtune's CLI
and what a run imports (torch, transformers, peft, datasets: about 8 s on a 2-core machine) and
runs nothing. For each request (one JSON line on stdin) it forks a child that runs the CLI's own
entry point (`fedtune.cli.main`, as `python -m fedtune.cli ARGS` does) with its output in the
named files, and answers with the child's pid, then its exit code. The child is a process that
never ran a run, loaded a model or drew a random number: what the tests want from a fresh process.
Forking is as safe as PyTorch's DataLoader workers (forked after the same imports): nothing has
computed yet, so no OpenMP pool exists; the server checks it runs no Python thread but the main
one and has not imported `datasets` (pyarrow starts jemalloc's background thread), and a child
past its timeout is killed by the caller, so a hang fails a test instead of stalling the suite."""

from __future__ import annotations

import json
import os
import sys
import threading


def child(req: dict) -> None:
    """Run the CLI as `python -m fedtune.cli ARGS` would, then leave without returning."""
    code = 1
    try:
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.argv = ["fedtune", *req["args"]]
        from fedtune.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()  # what a normal interpreter exit runs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fedtune.cli  # noqa: F401
    import fedtune.recipes.federated  # noqa: F401

    if threading.active_count() != 1 or "pyarrow" in sys.modules:
        raise SystemExit(f"forkserver: {threading.enumerate()} after the imports; forking would not be safe")
    out = sys.stdout
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


if __name__ == "__main__":
    serve()

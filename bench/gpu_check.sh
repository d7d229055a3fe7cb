#!/usr/bin/env bash
# The GPU checks of issue #26, as one script that runs unchanged on a CUDA machine (a few minutes)
# and writes everything it measured into a folder:
#
#   bench/gpu_check.sh [OUT_DIR]          # OUT_DIR: default $OUT, else gpu-check-results
#   bench/gpu_check.sh --no-gpu [OUT_DIR] # skip every GPU part (say so, list them, exit 0)
#
# Python: $PYTHON, else python3 (the machine's own CUDA build of torch; the CPU pin of
# pyproject.toml is not installed there). With no network, fedtune's dependencies come from a
# wheel folder as in ../shared/gpu/README.md: if `.gpu-wheels/` is in the repository root and
# transformers is not importable, they are installed into /tmp/site (--no-index --no-deps).
#
# Steps (each with a time limit; each writes OUT/<step>.txt; OUT/summary.txt has one line each):
#   env       GPU, driver, Python and library versions; what model.dtype/train.bf16 'auto' pick here
#   gpu       the tests marked `gpu` (run whenever torch sees a GPU: the GPU-vs-CPU parity test,
#             QLoRA 4/8-bit and Liger's kernels when bitsandbytes / liger-kernel are importable: put
#             their wheels in .gpu-wheels with `pip download --no-deps -d .gpu-wheels liger-kernel==0.8.5
#             bitsandbytes==0.50.2`; bitsandbytes alone is 43 MB, mind a transfer limit)
#   unit      the unit tests without Flower (tests/unit -m "not flower")
#   tiny      `fedtune run configs/tiny.yaml` (model.device: auto), and again with dtype/bf16 auto
#   matrix    the strategy matrix rows pcl, pcl:predictions, fedkseed, fedkseed:full-one-byte
#   throughput  bench/throughput_gpu.py: one client's local step, bare PyTorch + PEFT vs fedtune vs TRL's
#             SFTTrainer (when trl is importable), SmolLM2-135M and Llama-1B shapes, tokens/s and MFU
set -u
cd "$(dirname "$0")/.."

NO_GPU=0
if [ "${1:-}" = "--no-gpu" ]; then NO_GPU=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu-check-results}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

PY="${PYTHON:-python3}"
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false COLUMNS=200
export FEDTUNE_CACHE="${FEDTUNE_CACHE:-/tmp/fedtune-gpu-check-cache}"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_SECONDS COMMAND...: run it, keep its output, one summary line
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    local tail_line
    tail_line="$(grep -E '(passed|failed|error)' "$OUT_DIR/$name.txt" | tail -1)"
    note "$name: rc=$rc ($((SECONDS - t0)) s) ${tail_line}"
}

PLAN="env gpu unit tiny matrix throughput"
if [ "$NO_GPU" = 1 ]; then
    note "no GPU: --no-gpu given; skipped: $PLAN"
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> "$OUT_DIR/torch.txt"; then
    note "no GPU: torch.cuda.is_available() is False for $PY (or torch is missing: $OUT_DIR/torch.txt); skipped: $PLAN"
    exit 0
fi

if ! "$PY" -c "import transformers" 2> /dev/null && compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl \
        > "$OUT_DIR/install.txt" 2>&1
    note "install: rc=$? (.gpu-wheels -> /tmp/site)"
fi

XDIST=()
if "$PY" -c "import xdist" 2> /dev/null; then XDIST=(-n 8 --dist loadgroup); fi

# shellcheck disable=SC2016
step env 120 bash -c '
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$0" -c "import sys, torch, transformers, peft
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda)
print(\"transformers\", transformers.__version__, \"peft\", peft.__version__)
from fedtune.models.precision import choose_precision
print(\"auto here:\", choose_precision(\"auto\", \"auto\", torch.device(\"cuda\")).reason)"
    "$0" -m fedtune.cli validate configs/demo.yaml --no-data | head -3' "$PY"
step gpu 300 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider -m gpu tests/unit tests/integration \
    --ignore tests/integration/test_flower.py --ignore tests/integration/test_trackers.py
step unit 420 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider "${XDIST[@]}" -m "not flower" tests/unit
step tiny 180 bash -c '
    "$0" -m fedtune.cli run configs/tiny.yaml --overwrite --no-progress --set output_dir="$1/runs/tiny" &&
    "$0" -m fedtune.cli run configs/tiny.yaml --overwrite --no-progress --set output_dir="$1/runs/tiny-auto" \
        --set model.dtype=auto --set train.bf16=auto &&
    for r in tiny tiny-auto; do echo "== $r round 0:"; grep -m1 "\"client\": null" "$1/runs/$r/metrics.jsonl"; done' \
    "$PY" "$OUT_DIR"
step matrix 420 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider "${XDIST[@]}" \
    tests/integration/test_strategy_matrix.py -k "pcl or fedkseed"
TRL=()
if ! "$PY" -c "import trl" 2> /dev/null; then TRL=(--no-trl); fi
step throughput 300 "$PY" bench/throughput_gpu.py --device cuda --steps 8 "${TRL[@]}" --out "$OUT_DIR/throughput_gpu.json"
note "results: $OUT_DIR"

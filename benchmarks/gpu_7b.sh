#!/usr/bin/env bash
# One-shot GPU benchmark: LLaMA-7B shape (random bf16 weights, adapter K=10, L=30) on one GPU,
# adapterlab vs PEFT. Designed to finish in about 5 minutes on an H100, model construction
# and torch.compile included; the JSON is rewritten after every section, so a run cut short
# still leaves its numbers behind.
#
#   bash benchmarks/gpu_7b.sh [OUT_DIR]        # on the GPU machine, from the repository root
#   bash benchmarks/gpu_7b.sh --dry-run        # same code path on the CPU, tiny shape, seconds
#   DTYPE=int8 bash benchmarks/gpu_7b.sh ...   # the frozen base: bf16 (default), fp32, or int8 (ours int8
#                                              # weight-only vs PEFT bf16 on the same weights)
#
# Writes OUT_DIR/bench.json, OUT_DIR/bench.log and OUT_DIR/env.txt (OUT_DIR defaults to $OUT,
# else ./bench_out). Needs python3 with torch (CUDA), transformers, peft, safetensors and
# sentencepiece; adapterlab is imported from this checkout (no install needed).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DTYPE="${DTYPE:-bf16}"

if [ "${1:-}" = "--dry-run" ]; then
    OUT_DIR="${2:-$(mktemp -d)}"
    mkdir -p "$OUT_DIR"
    exec "$PY" benchmarks/run.py --device cpu --shape tiny --dtype "$DTYPE" --build memory --compile on \
        --threads 1 --budget-s 240 --json "$OUT_DIR/bench.json"
fi

OUT_DIR="${1:-${OUT:-bench_out}}"
mkdir -p "$OUT_DIR"
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1
} | tee "$OUT_DIR/env.txt"

# --budget-s: once 300 s are spent, later sections/rounds are skipped (round 1 of training always runs).
# timeout: a hard stop well inside a 10-minute device call.
timeout 540 "$PY" benchmarks/run.py --device cuda --dtype "$DTYPE" --json "$OUT_DIR/bench.json" --budget-s 300 2>&1 \
    | tee "$OUT_DIR/bench.log"
status=${PIPESTATUS[0]}
echo "benchmarks/run.py exit status: $status (124 = stopped by the 540 s timeout; bench.json has what was measured)"
exit "$status"

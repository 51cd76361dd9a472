#!/usr/bin/env bash
# The full end-to-end benchmark matrix on a GPU (the results to commit): every model in every dtype,
# full workloads (not --quick): batch 1 against HF eager, HF static cache + torch.compile and the
# eager reference under torch.compile(mode="reduce-overhead"); 256 mixed requests in HF's padded
# batches and through gptfast's continuous batching; kernels per decode step, CUDA-graph capture time.
# One `python -m benchmarks --suite e2e` process per (model, dtype), each writing its own result files.
#
#   benchmarks/gpu_e2e.sh [OUT [MODELS [DTYPES [EXTRA...]]]]
#     OUT     default: $OUT, else ./gpu-e2e-out
#     MODELS  comma-separated presets or checkpoint folders (default: gpt2,gpt2-medium,gpt2-xl)
#     DTYPES  comma-separated from bf16,fp16,fp32 (default: bf16,fp16)
#     EXTRA   more `gptfast bench` options for every run (e.g. --quick, --seed 1)
#
# The whole matrix needs more than one 10-minute device call: run a subset per call, e.g.
#   benchmarks/gpu_e2e.sh "$OUT" gpt2 bf16,fp16
# The larger shapes take longest (HF eager at batch 1, and compiling the reference for 48 layers):
# give gpt2-xl one dtype per call.
#   GPU_E2E_SKIP_INSTALL=1 benchmarks/gpu_e2e.sh "$OUT" gpt2-xl fp16   (installed already on this machine)
# GPU_E2E_BUDGET_S (default 570) caps the whole script; each run's timeout is what is left of it,
# and a run that would get under 60 s is skipped (listed as such in the summary).
#
# Files under OUT (flat): gpu_e2e.log, pip.log, nvidia-smi.txt, per run e2e-<gpu>-<stamp>.{json,csv,md}
# (e2e-<gpu>-<stamp>.partial.json instead, with the rows measured so far, when a run is cut short),
# summary.md. Without a GPU it says so and exits 0. GPU_CHECK_DEVICE=cpu is a dry run of the plumbing
# on a machine without a GPU (no install, CPU workloads; try MODELS=tiny DTYPES=fp32).
# A copy of the tree without .git records the commit given in GPTFAST_GIT_COMMIT (and
# GPTFAST_GIT_DIRTY=0/1) in every result file, as for gpu_check.sh:
#   GPTFAST_GIT_COMMIT=<sha> benchmarks/gpu_e2e.sh "$OUT" gpt2 bf16,fp16
set -euo pipefail

OUT=${1:-${OUT:-./gpu-e2e-out}}
MODELS=${2:-gpt2,gpt2-medium,gpt2-xl}
DTYPES=${3:-bf16,fp16}
shift $(( $# < 3 ? $# : 3 ))
EXTRA=("$@")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root
export PYTHONUNBUFFERED=1

START=$SECONDS
BUDGET=${GPU_E2E_BUDGET_S:-570}
STEPS=$(mktemp)
trap 'rm -f "$STEPS"' EXIT
FAILED=0

source benchmarks/gpu_lib.sh

main() {
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
    echo "gptfast e2e matrix, $(date -u +%Y-%m-%dT%H:%M:%SZ), OUT=$OUT, device $DEVICE," \
         "models $MODELS, dtypes $DTYPES${EXTRA[*]:+, extra: ${EXTRA[*]}}"

    gpu_or_exit "$OUT"
    if [[ ${GPU_E2E_SKIP_INSTALL:-0} == 1 ]]; then
        echo "install (pip -e .): skipped (GPU_E2E_SKIP_INSTALL=1)" >> "$STEPS"
    else
        install_in_place "$OUT"
    fi

    local model dtype
    for model in ${MODELS//,/ }; do
        for dtype in ${DTYPES//,/ }; do
            step "e2e $model $dtype" "$BUDGET" 60 python3 -m benchmarks --suite e2e --device "$DEVICE" \
                --model "$model" --dtype "$dtype" --out "$OUT" --formats json,csv,md --no-progress \
                "${EXTRA[@]}"
        done
    done

    summarize "$OUT"
}

main 2>&1 | tee -a "$OUT/gpu_e2e.log"
exit "${PIPESTATUS[0]}"

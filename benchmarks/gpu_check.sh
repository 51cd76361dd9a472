#!/usr/bin/env bash
# The GPU check: install in place, the quick e2e suite (gpt2 in bf16, with the decode graph's kernel
# count and every kernel's device time in one replay), the GPU tests (every kernel compiled), the quick
# ops suite, a summary; everything under $OUT, a short table printed last. Budget: 300 s on an
# H100/H200 with a cold Triton cache (install up to 60, e2e 100, pytest 120, ops what is left, up
# to 60). Every step is cut by
# SIGINT at its timeout: pytest still prints its summary (each test also has a 60 s limit) and the
# suites leave the rows they measured (<name>-<gpu>-<stamp>.partial.json, rewritten as rows come).
# Second ready command, the compiled references (torch.compile) at batch 1 and the full plan:
#   GPU_E2E_SKIP_INSTALL=1 benchmarks/gpu_e2e.sh "$OUT" gpt2 bf16
# The whole e2e matrix (gpt2, gpt2-medium, gpt2-xl x bf16, fp16) is gpu_e2e.sh too.
#
#   benchmarks/gpu_check.sh [OUT]        (default: $OUT, else ./gpu-out)
#
# Files under OUT (flat): gpu_check.log, pip.log, nvidia-smi.txt, pytest.log, ops-<gpu>-<stamp>.json,
# ops-<gpu>-<stamp>.png, e2e-<gpu>-<stamp>.json (or .partial.json when cut short), summary.md.
# Without a GPU it says so and exits 0. GPU_CHECK_DEVICE=cpu is a dry run of the script's plumbing
# on a machine without a GPU (no install, CPU suites); its numbers mean nothing for the GPU.
# A copy of the tree without .git (the device tool sends none) records the commit given in
# GPTFAST_GIT_COMMIT (and GPTFAST_GIT_DIRTY=0/1) in every result file:
#   GPTFAST_GIT_COMMIT=$(git rev-parse HEAD) benchmarks/gpu_check.sh "$OUT"   (the sha typed literally)
set -euo pipefail

OUT=${1:-${OUT:-./gpu-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root
export PYTHONUNBUFFERED=1

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-300}  # whole-script seconds; each step's timeout is cut to what is left
STEPS=$(mktemp)
trap 'rm -f "$STEPS"' EXIT
FAILED=0

source benchmarks/gpu_lib.sh

main() {
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
    echo "gptfast GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), OUT=$OUT, device $DEVICE"

    gpu_or_exit "$OUT"
    install_in_place "$OUT"

    # Order = priority when the budget runs out: the end-to-end numbers first (the runtime's
    # targets), then the GPU tests, then the per-kernel suite.
    # gpt2 bf16: batch 1, padded batches and continuous batching against HF, the kernels of one
    # decode-graph replay (count and device time of each) and CUDA-graph capture time. The
    # torch.compile references take minutes to compile: they are the second command (see the top).
    # The CPU dry run times fp32 (the suite's CPU default): bf16 there adds HF in both dtypes and
    # takes minutes on a small machine, for plumbing that is the same.
    local e2e_dtype=bf16
    [[ $DEVICE == cpu ]] && e2e_dtype=fp32
    step "e2e suite --quick" 100 10 python3 -m benchmarks --suite e2e --quick --device "$DEVICE" \
        --model "${GPU_CHECK_MODEL:-gpt2}" --dtype "$e2e_dtype" --out "$OUT" --formats json --no-progress

    # The gpu-marked tests compile every kernel variant (a minute of Triton compiles on a cold
    # cache), the most revealing files first; 60 s per test at most.
    export GPTFAST_TEST_TIMEOUT_S=${GPTFAST_TEST_TIMEOUT_S:-60}
    # shellcheck disable=SC2046
    step "pytest -m gpu" 120 10 pytest_to "$OUT/pytest.log" \
        python3 -m pytest $(gpu_test_files) -m gpu -q -p no:cacheprovider -rfEs --durations=15 $(pytest_args)
    tail -n 3 "$OUT/pytest.log" || true

    step "ops suite --quick" 60 10 python3 -m benchmarks --suite ops --quick --device "$DEVICE" \
        --out "$OUT" --formats json --no-progress

    echo "next (the torch.compile references at batch 1, the full plan):" \
         "GPU_E2E_SKIP_INSTALL=1 benchmarks/gpu_e2e.sh \"$OUT\" gpt2 bf16"
    summarize "$OUT"
}

# A pipeline, not exec > >(tee): the script ends only after tee has written the last line.
main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

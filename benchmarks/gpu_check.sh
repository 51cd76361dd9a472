#!/usr/bin/env bash
# The GPU check (GPU.md): install in place, GPU tests (every kernel compiled), the quick benchmark suites
# (e2e: gpt2 in bf16), a summary; everything under $OUT, a short table printed last. Budget: under 6
# minutes on an H100. The full e2e matrix (gpt2, gpt2-medium, gpt2-xl x bf16, fp16) is gpu_e2e.sh.
#
#   benchmarks/gpu_check.sh [OUT]        (default: $OUT, else ./gpu-out)
#
# Files under OUT (8 at most, flat): gpu_check.log, pip.log, nvidia-smi.txt, pytest.log,
# ops-<gpu>-<stamp>.json, ops-<gpu>-<stamp>.png, e2e-<gpu>-<stamp>.json, summary.md.
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
BUDGET=${GPU_CHECK_BUDGET_S:-345}  # whole-script seconds; each step's timeout is cut to what is left
STEPS=$(mktemp)
trap 'rm -f "$STEPS"' EXIT
FAILED=0

# step NAME SECONDS CMD...: run CMD under a timeout of SECONDS (cut to the budget left), record
# "NAME: ok|FAILED (rc)|TIMEOUT|skipped, Ns" in $STEPS, never abort the script.
step() {
    local name=$1 want=$2 left rc t0
    shift 2
    left=$(( BUDGET - (SECONDS - START) ))
    (( want > left )) && want=$left
    if (( want < 10 )); then
        echo "== $name: skipped (time budget spent)"
        echo "$name: skipped (budget)" >> "$STEPS"
        return 0
    fi
    echo "== $name (timeout ${want}s): $*"
    t0=$SECONDS
    rc=0
    # bash -c so that CMD may be one of the exported helper functions below
    timeout --kill-after=10 "$want" bash -c '"$@"' step "$@" || rc=$?
    if (( rc == 0 )); then
        echo "$name: ok, $(( SECONDS - t0 ))s" >> "$STEPS"
    elif (( rc == 124 || rc == 137 )); then
        echo "$name: TIMEOUT after ${want}s" >> "$STEPS"; FAILED=1
    else
        echo "$name: FAILED (exit $rc), $(( SECONDS - t0 ))s" >> "$STEPS"; FAILED=1
    fi
    echo "== $name done: $(tail -n 1 "$STEPS")"
}

to_file() { local file=$1; shift; "$@" >> "$file" 2>&1; }
# pytest exits 5 when no test was selected (e.g. no gpu-marked test yet): not a failure.
pytest_to() { local rc=0; to_file "$@" || rc=$?; (( rc == 5 )) && rc=0; return $rc; }
export -f to_file pytest_to

main() {
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
    echo "gptfast GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), OUT=$OUT, device $DEVICE"

    if [[ $DEVICE == cpu ]]; then
        echo "DRY RUN on the CPU (GPU_CHECK_DEVICE=cpu): plumbing only, no GPU was used"
    elif ! nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
        echo "NO GPU HERE: nvidia-smi failed (see $OUT/nvidia-smi.txt). Nothing was checked; this is not a failure."
        exit 0
    elif ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "NO GPU HERE: nvidia-smi works but torch.cuda.is_available() is False" \
             "(torch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing))." \
             "Nothing was checked; this is not a failure."
        exit 0
    else
        head -n 12 "$OUT/nvidia-smi.txt"
    fi

    if [[ $DEVICE == cpu ]]; then
        echo "install (pip -e .): skipped (dry run)" >> "$STEPS"
    else
        step "install (pip -e .)" 60 to_file "$OUT/pip.log" \
            python3 -m pip install --no-index --disable-pip-version-check --no-build-isolation \
            --no-deps -e .
    fi

    # Order = priority when the budget runs out: the end-to-end numbers first (the runtime's
    # targets), then the GPU tests, then the per-kernel suite.
    # gpt2 bf16: batch 1, padded batches and continuous batching against HF, kernels per decode
    # step and CUDA-graph capture time (the full model x dtype matrix: benchmarks/gpu_e2e.sh).
    # The CPU dry run times fp32 (the suite's CPU default): bf16 there adds HF in both dtypes and
    # takes minutes on a small machine, for plumbing that is the same.
    local e2e_dtype=bf16
    [[ $DEVICE == cpu ]] && e2e_dtype=fp32
    step "e2e suite --quick" 140 python3 -m benchmarks --suite e2e --quick --device "$DEVICE" \
        --model gpt2 --dtype "$e2e_dtype" --out "$OUT" --formats json --no-progress

    # The gpu-marked tests compile every kernel variant (minutes of Triton compiles on a cold cache).
    step "pytest -m gpu" 150 pytest_to "$OUT/pytest.log" \
        python3 -m pytest tests -m gpu -q -p no:cacheprovider -rfEs --durations=15
    tail -n 3 "$OUT/pytest.log" || true

    step "ops suite --quick" 90 python3 -m benchmarks --suite ops --quick --device "$DEVICE" \
        --out "$OUT" --formats json --no-progress

    echo
    echo "== summary ($(( SECONDS - START ))s in all)"
    python3 -m gptfast.bench.summary "$OUT" "$STEPS" || FAILED=1
    return $FAILED
}

# A pipeline, not exec > >(tee): the script ends only after tee has written the last line.
main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

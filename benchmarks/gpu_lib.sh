# Shared by benchmarks/gpu_check.sh and benchmarks/gpu_e2e.sh (sourced, not run). The caller sets
# START (=$SECONDS), BUDGET (whole-script seconds), STEPS (a file) and FAILED=0 first.

# step NAME WANT LEAST CMD...: run CMD under a timeout of WANT seconds, cut to what is left of the
# budget; skipped when that is under LEAST. Records "NAME: ok|FAILED (rc)|TIMEOUT|skipped, Ns" in
# $STEPS and never aborts the script. The timeout sends SIGINT first (pytest then prints its summary,
# the benchmarks write the rows they have), SIGKILL STEP_GRACE_S (default 15) seconds later.
step() {
    local name=$1 want=$2 least=$3 left rc t0
    shift 3
    left=$(( BUDGET - (SECONDS - START) ))
    (( want > left )) && want=$left
    if (( want < least )); then
        echo "== $name: skipped (${left}s of the budget left, needs ${least}s)"
        echo "$name: skipped (budget)" >> "$STEPS"
        return 0
    fi
    echo "== $name (timeout ${want}s): $*"
    t0=$SECONDS
    rc=0
    # bash -c so that CMD may be one of the exported helper functions below. NOTE: --foreground is
    # not used: the signal goes to the command's whole process group (pytest's workers, tee).
    timeout -s INT --kill-after="${STEP_GRACE_S:-15}" "$want" bash -c '"$@"' step "$@" || rc=$?
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
# pytest_args: the per-test timeout (GPTFAST_TEST_TIMEOUT_S, tests/conftest.py) as pytest-timeout's
# --timeout when the plugin is installed; the conftest's fallback handles it otherwise.
pytest_args() {
    if python3 -c 'import pytest_timeout' 2>/dev/null; then
        echo "--timeout=${GPTFAST_TEST_TIMEOUT_S:-60}"
    fi
}
# gpu_test_files: every test file, the most revealing first (kernels, then the graphs and the
# kernel count, then sampling statistics, generation, benchmarks; the inductor compile last).
gpu_test_files() {
    local first="test_attention test_norm test_graphs test_kernels_tool test_sampling test_kernels_e2e
                 test_bench test_block_manager" f name
    for name in $first; do [[ -f tests/$name.py ]] && echo "tests/$name.py"; done
    for f in tests/test_*.py; do
        name=$(basename "$f" .py)
        [[ " $(echo $first) " == *" $name "* || $name == test_static_ref ]] || echo "$f"
    done
    [[ -f tests/test_static_ref.py ]] && echo tests/test_static_ref.py
    return 0
}
# pytest exits 5 when no test was selected (e.g. no gpu-marked test yet): not a failure.
pytest_to() { local rc=0; to_file "$@" || rc=$?; (( rc == 5 )) && rc=0; return $rc; }
export -f to_file pytest_to

# gpu_or_exit OUT: with GPU_CHECK_DEVICE=cpu announce a dry run; otherwise exit 0 with a message
# unless nvidia-smi and torch both see a GPU (nvidia-smi's output goes to OUT/nvidia-smi.txt).
gpu_or_exit() {
    local out=$1
    if [[ ${GPU_CHECK_DEVICE:-cuda} == cpu ]]; then
        echo "DRY RUN on the CPU (GPU_CHECK_DEVICE=cpu): plumbing only, no GPU was used"
    elif ! nvidia-smi > "$out/nvidia-smi.txt" 2>&1; then
        echo "NO GPU HERE: nvidia-smi failed (see $out/nvidia-smi.txt). Nothing was measured; this is not a failure."
        exit 0
    elif ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "NO GPU HERE: nvidia-smi works but torch.cuda.is_available() is False" \
             "(torch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing))." \
             "Nothing was measured; this is not a failure."
        exit 0
    else
        head -n 12 "$out/nvidia-smi.txt"
    fi
}

# install_in_place OUT: the offline editable install (the GPU machine has no package index), logged to OUT/pip.log; a dry run skips it.
install_in_place() {
    if [[ ${GPU_CHECK_DEVICE:-cuda} == cpu ]]; then
        echo "install (pip -e .): skipped (dry run)" >> "$STEPS"
    else
        step "install (pip -e .)" 60 10 to_file "$1/pip.log" \
            python3 -m pip install --no-index --disable-pip-version-check --no-build-isolation \
            --no-deps -e .
    fi
}

# summarize OUT: the step statuses and the result tables (gptfast.bench.summary, also written to
# OUT/summary.md); returns 1 when a step failed or the summary found a failed check.
summarize() {
    echo
    echo "== summary ($(( SECONDS - START ))s in all)"
    python3 -m gptfast.bench.summary "$1" "$STEPS" || FAILED=1
    return $FAILED
}

"""Timers: median µs of a callable, after warm-up.

CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls, median), falling back to
CUDA events when triton is missing. CPU: wall-clock medians of `perf_counter`.
Callers rotate inputs inside the callable (see `runner.rotating`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_cpu(fn: Callable[[], object], warmup: int = 2, min_reps: int = 5, max_reps: int = 50,
             budget_s: float = 0.5) -> float:
    """Median wall-clock µs of `fn()`: `warmup` calls, then at least `min_reps` and at most `max_reps`
    timed calls, stopping early once `budget_s` seconds have been spent timing."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median µs of `fn()` on the current CUDA stream, timed with CUDA events.

    `warmup_ms` and `rep_ms` are milliseconds (do_bench's meaning), not counts.
    """
    import torch

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3
    # Fallback without triton: events around each call, L2 not flushed.
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / once_ms))):
        fn()
    samples = []
    for _ in range(max(5, int(rep_ms / once_ms))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples) * 1e3


def timer_for(device: str) -> Callable[[Callable[[], object]], float]:
    """The timer for `device`: `time_cuda` for "cuda[:i]", `time_cpu` otherwise."""
    return time_cuda if device.startswith("cuda") else time_cpu

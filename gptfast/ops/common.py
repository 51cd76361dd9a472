"""What every op shares: backend choice, the reference naming rule, the comparison helper.

Backend choice: CUDA tensors go to the Triton kernel, CPU tensors to the
eager reference. Inside `backend("triton")` every op that has a kernel runs it (with
`TRITON_INTERPRET=1` the kernels run on the CPU), inside `backend("reference")` every op runs its
reference; the engine enters the backend its options name around its model calls. Inside
`as_cuda(sm_count)` CPU tensors take the CUDA branches: that is how `gptfast kernels` walks the
GPU path on a machine without one (its Triton launches are compiled, never run).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable

import torch

from . import _triton

_BACKENDS = ("auto", "triton", "reference")
# The backend forced by `backend(...)`; "auto" outside it.
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("gptfast_backend", default="auto")
_GEMV_DECODE: contextvars.ContextVar[bool] = contextvars.ContextVar("gptfast_gemv_decode", default=True)
# The SM count the CUDA branches assume while `as_cuda` is active; None outside it.
_AS_CUDA: contextvars.ContextVar[int | None] = contextvars.ContextVar("gptfast_as_cuda", default=None)


@contextlib.contextmanager
def as_cuda(sm_count: int):
    """Within this context, CPU tensors take the ops' CUDA branches (Triton launchers, the fused
    forward, cuBLAS-shaped calls) as if they were on a GPU with `sm_count` SMs.

    Only for tools that intercept every Triton launch (`gptfast.bench.kernels` compiles them
    for a GPU target instead of running them): a launch that is not intercepted fails, since
    a compiled kernel cannot run on CPU memory.

    Parameters
    ----------
    sm_count : int
        SMs of the GPU the branches are taken for (it sizes the split-KV grid), >= 1.

    Examples
    --------
    >>> with as_cuda(132):
    ...     use_triton(torch.zeros(1))
    True
    """
    if not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 1:
        raise ValueError(f"as_cuda: sm_count must be an int >= 1, got {sm_count!r}")
    token = _AS_CUDA.set(sm_count)
    try:
        yield
    finally:
        _AS_CUDA.reset(token)


def on_cuda(device: torch.device) -> bool:
    """Whether an op on `device` takes its CUDA branch: a CUDA device, or any inside `as_cuda`."""
    return device.type == "cuda" or _AS_CUDA.get() is not None


def as_cuda_sm_count() -> int | None:
    """The SM count `as_cuda` assumes, or None outside it."""
    return _AS_CUDA.get()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, off_gpu: int) -> int:
    """SMs of `device`: a CUDA device's own count, the count `as_cuda` assumes, else `off_gpu`
    (what an op sizes its grid by in the interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return as_cuda_sm_count() or off_gpu


@contextlib.contextmanager
def backend(name: str, gemv_decode: bool | None = None):
    """Within this context, the dispatched ops run the backend `name`.

    Parameters
    ----------
    name : str
        "auto" (CUDA tensors to Triton, CPU tensors to the reference: what ops do outside any
        context), "triton" (every op that has a kernel runs it; an error where Triton is not
        installed) or "reference" (the eager references everywhere).
    gemv_decode : bool or None
        Whether the model's decode steps of 1-8 rows on the kernel path take the fused GEMV ops
        (True, the default outside any context) or the unfused ones (False: cuBLAS GEMMs with
        fused epilogues, the GEMV path's baseline in the benchmarks); None keeps the enclosing
        context's choice. See `gemv_decode_enabled`.

    Examples
    --------
    >>> with backend("reference"):
    ...     use_triton(torch.zeros(1, device="cuda"))
    False
    """
    if name not in _BACKENDS:
        raise ValueError(f"ops.backend: name must be one of {_BACKENDS}, got {name!r}")
    if gemv_decode is None:
        gemv_decode = _GEMV_DECODE.get()
    if not isinstance(gemv_decode, bool):
        raise ValueError(f"ops.backend: gemv_decode must be True, False or None, got {gemv_decode!r}")
    token, gemv_token = _BACKEND.set(name), _GEMV_DECODE.set(gemv_decode)
    try:
        yield
    finally:
        _GEMV_DECODE.reset(gemv_token)
        _BACKEND.reset(token)


def gemv_decode_enabled() -> bool:
    """Whether the innermost `backend(...)` context lets small decode steps take the fused GEMV
    ops (True outside any context)."""
    return _GEMV_DECODE.get()


def kernel_backend() -> str:
    """The backend the innermost `backend(...)` context forces ("triton", "reference"), or "auto"."""
    return _BACKEND.get()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on `tensors` should run its Triton kernel (never without Triton)."""
    backend = kernel_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        if not _triton.AVAILABLE:
            raise RuntimeError(f"the 'triton' kernel backend was asked for (kernels='triton' or "
                               f"GPTFAST_KERNELS=triton), but {_triton.MISSING_REASON}")
        return True
    if not _triton.AVAILABLE:
        return False
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(on_cuda(t.device) for t in tensors)


def ref_name(op: str) -> str:
    """The name of op `op`'s eager reference: `op + "_ref"`; an in-place op keeps its trailing
    underscore last (`bias_gelu_` -> `bias_gelu_ref_`)."""
    return f"{op[:-1]}_ref_" if op.endswith("_") else f"{op}_ref"


def dispatch(fast: Callable, ref: Callable) -> Callable:
    """An op that calls `fast` (the Triton launcher) or `ref` (eager) per `use_triton`.

    The choice looks at the tensor arguments; both must share one signature.
    """

    @functools.wraps(fast)
    def op(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return fast(*args, **kwargs) if use_triton(*tensors) else ref(*args, **kwargs)

    op.fast = fast
    op.ref = ref
    return op


# Tolerances per dtype for comparing an op against its fp32 reference (the README's correctness policy).
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 1e-2, "rtol": 5e-2},
}


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> str | None:
    """None when `actual` matches `expected` elementwise within `atol + rtol * |expected|`,
    otherwise a report: shapes, max abs error, max relative error and the first mismatches.

    NaN in one and not the other is a mismatch; NaN in both at one place is a match.
    """
    label = f"{name}: " if name else ""
    if actual.shape != expected.shape:
        return f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = (a - e).abs()
    # NOTE: finite on both sides, or an expected inf would accept anything (inf <= inf).
    close = torch.isfinite(a) & torch.isfinite(e) & (diff <= atol + rtol * e.abs())
    bad = ~(both_nan | same_inf | close)
    if not bool(bad.any()):
        return None
    finite = ~(both_nan | same_inf)
    max_abs = diff[finite].max().item() if finite.any() else float("nan")
    rel = diff / e.abs().clamp_min(1e-12)
    max_rel = rel[finite].max().item() if finite.any() else float("nan")
    idx = bad.nonzero()[:8]
    lines = [
        (f"{label}{int(bad.sum())} of {bad.numel()} elements differ "
         f"(atol={atol:g}, rtol={rtol:g}); max abs err {max_abs:.3e}, max rel err {max_rel:.3e}")
    ]
    for i in idx.tolist():
        i = tuple(i)
        lines.append(f"  at {i}: got {a[i].item():.6g}, expected {e[i].item():.6g}")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """`compare`, raising AssertionError with its report on a mismatch."""
    report = compare(actual, expected, atol, rtol, name)
    if report is not None:
        raise AssertionError(report)

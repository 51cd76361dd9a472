"""Triton, or stand-ins that let the op modules import where Triton is not installed.

Triton ships wheels for Linux only. Elsewhere (or in an environment without it) the op modules
must still import, because their eager references are gptfast's CPU path: the kernels are
defined with stand-in decorators and raise a clear error if launched, and `AVAILABLE` tells the
dispatcher (`common.use_triton`) and the benchmarks to use or time the references instead.

Every op module imports Triton through here (`from ._triton import tl, triton`); a test checks
that no module in gptfast imports it directly.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    MISSING_REASON = None
except ImportError as exc:  # no wheel for this platform, or not installed
    AVAILABLE = False
    MISSING_REASON = f"Triton is not installed ({type(exc).__name__}: {exc})"

    class _MissingKernel:
        """What `@triton.jit` gives without Triton: launching it says why it cannot run."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(f"cannot launch the Triton kernel {self.__name__}: {MISSING_REASON}; "
                               "gptfast runs the eager references instead unless GPTFAST_KERNELS=triton")

        __call__ = __getitem__

    class _MissingTriton:
        """`triton` without Triton: `jit` (bare or with options) wraps kernels in `_MissingKernel`."""

        @staticmethod
        def jit(fn=None, **_options):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        # host-side helpers the launchers and benchmark cases size their grids and tiles with
        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return max(int(n), 0) if n <= 1 else 1 << (int(n) - 1).bit_length()

        def __getattr__(self, name):
            raise RuntimeError(f"triton.{name} is unavailable: {MISSING_REASON}")

    class _MissingLanguage:
        """`triton.language` without Triton: names resolve (kernel bodies are never run)."""

        def __getattr__(self, name):
            return None

    triton = _MissingTriton()
    tl = _MissingLanguage()

__all__ = ["AVAILABLE", "MISSING_REASON", "tl", "triton"]

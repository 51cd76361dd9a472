"""Runtime options and the environment variables that give their defaults, read in this one place.

    GPTFAST_KERNELS       auto (default) | triton | reference
        Which implementation the ops run: "auto" sends CUDA tensors to the Triton kernels and CPU
        tensors to the eager references; "triton" sends every op that has a kernel through it
        (with TRITON_INTERPRET=1 the kernels run on the CPU); "reference" runs the eager
        references everywhere.
    GPTFAST_CUDA_GRAPHS   unset (default) | 0 | 1
        0 switches the decode graph runner off, 1 on (on the CPU: its static-buffer step runs
        eagerly, which is how the tests check that path); unset means on for CUDA models only.

The variables are read when an `Engine` (or a `generate()` call, or a beam search) is built and
only as defaults: `Engine(model, kernels=..., cuda_graphs=...)` overrides them. Nothing reads them
while a step runs; the ops take their backend from `gptfast.ops.backend`, which the engine enters
around its model calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

KERNEL_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime runs a model.

    Parameters
    ----------
    kernels : str
        "auto", "triton" or "reference" (see the module docstring).
    cuda_graphs : bool or None
        Decode steps through the graph runner: True, False, or None (on for CUDA models only).
    gemv_decode : bool
        Decode steps of 1-8 rows on the kernel path take the fused GEMV ops (True) or the unfused
        ones, cuBLAS GEMMs with fused epilogues (False: the baseline the benchmarks compare the
        GEMV path with). No environment variable sets it.
    """

    kernels: str = "auto"
    cuda_graphs: bool | None = None
    gemv_decode: bool = True

    def __post_init__(self):
        if self.kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels must be one of {KERNEL_BACKENDS}, got {self.kernels!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")
        if not isinstance(self.gemv_decode, bool):
            raise ValueError(f"gemv_decode must be True or False, got {self.gemv_decode!r}")

    @classmethod
    def from_environment(cls) -> RuntimeOptions:
        """The options GPTFAST_KERNELS and GPTFAST_CUDA_GRAPHS ask for (their defaults when unset).

        Raises
        ------
        ValueError naming the variable, its value and the values allowed.
        """
        return cls(kernels=_kernels_from_environment(), cuda_graphs=_graphs_from_environment())

    @classmethod
    def with_defaults(cls, kernels: str | None = None, cuda_graphs: bool | None = None,
                      gemv_decode: bool | None = None) -> RuntimeOptions:
        """The explicit arguments, the environment's values for those that are None (only those
        variables are read: an explicit argument overrides even a malformed variable)."""
        return cls(kernels=_kernels_from_environment() if kernels is None else kernels,
                   cuda_graphs=_graphs_from_environment() if cuda_graphs is None else cuda_graphs,
                   gemv_decode=True if gemv_decode is None else gemv_decode)

    def use_graphs(self, device_type: str) -> bool:
        """Whether decode steps on a `device_type` model go through the graph runner.

        Raises
        ------
        ValueError when graphs are asked for on CUDA with the reference ops (they sync with the
        host: a CUDA graph cannot capture them).
        """
        reference = self.kernels == "reference"
        if self.cuda_graphs is None:
            return device_type == "cuda" and not reference
        if self.cuda_graphs and reference and device_type == "cuda":
            raise ValueError("CUDA graphs cannot capture the eager reference ops (they sync with the "
                             "host): use kernels='auto' or 'triton' (GPTFAST_KERNELS) or turn the graphs off "
                             "(cuda_graphs=False or GPTFAST_CUDA_GRAPHS=0)")
        return self.cuda_graphs


def _kernels_from_environment() -> str:
    value = os.environ.get("GPTFAST_KERNELS", "").strip().lower() or "auto"
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"GPTFAST_KERNELS must be one of {KERNEL_BACKENDS}, got {value!r}")
    return value


def _graphs_from_environment() -> bool | None:
    value = os.environ.get("GPTFAST_CUDA_GRAPHS", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"GPTFAST_CUDA_GRAPHS must be 0, 1 or unset, got {value!r}")
    return None if value == "" else value == "1"

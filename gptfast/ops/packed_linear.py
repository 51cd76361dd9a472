"""The CPU linear on a prepacked weight: `F.linear(x, w, b)` through oneDNN's packed layout.

Motivation. A CPU decode step is a handful of matmuls of 1-8 rows against GPT-2's weights, so it
is bound by how fast the matmul kernels stream the weight. `F.linear` on a bf16 weight re-lays
the weight out for oneDNN on every call; oneDNN's linear on a copy laid out once (`reorder`)
skips that. Measured single-threaded on an AVX-512 Xeon, GPT-2 124M's decode matmuls: bf16
~1.5x faster than `F.linear`; fp32 at 8 rows 2.5-3.5x, at 4 rows ~2x, at 1-2 rows 0.8-0.9x (so
fp32 matmuls of fewer than `PACKED_FP32_ROWS` rows keep `F.linear`). The packed copy costs one
more copy of the weight in memory.

The copy is cached on a holder object (the model's `Linear` modules, and a holder for the tied head) and
keyed by the weight's address, dtype and version counter, so it is rebuilt whenever the weight
is replaced, cast or modified in place. There is no Triton kernel: on CUDA the model's linears
are cuBLAS or the GEMV ops. The reference is `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN's packed linear is in the CPU builds of torch that ship oneDNN (all x86-64 wheels)
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# fp32 matmuls with at least this many rows run on the packed weight
PACKED_FP32_ROWS = 3


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, holder) -> torch.Tensor:
    """`F.linear(x, w, b)` on a CPU weight, through oneDNN's linear on a packed copy of `w`
    cached as `holder._packed` where that is faster (see the module docstring).

    Parameters
    ----------
    x : Tensor [..., K]
        Activations, w's dtype.
    w : Tensor [N, K]
        The weight (nn.Linear layout), fp32 or bf16 on the CPU; any other weight takes `F.linear`.
    b : Tensor [N] or None
    holder : object
        Where the packed copy is cached: an attribute `_packed`, None or (key, packed weight).

    Returns
    -------
    Tensor [..., N], x's dtype.
    """
    if not (w.device.type == "cpu" and AVAILABLE and (
            w.dtype is torch.bfloat16 or (w.dtype is torch.float32 and x.numel() >= PACKED_FP32_ROWS * w.shape[1]))):
        return F.linear(x, w, b)
    try:
        key = (w.data_ptr(), w._version, w.dtype)
    except RuntimeError:  # an inference tensor keeps no version counter: no cache
        return F.linear(x, w, b)
    packed = holder._packed
    if packed is None or packed[0] != key:
        # the batch-size hint picks oneDNN's layout: decode batches (1 for bf16, 8 for fp32)
        packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1 if w.dtype is torch.bfloat16 else 8))
        holder._packed = packed
    return torch.ops.mkldnn._linear_pointwise(x, packed[1], b, "none", [], "")


def packed_linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, holder) -> torch.Tensor:
    """Eager reference of `packed_linear` (same signature): `F.linear`; `holder` is unused."""
    return F.linear(x, w, b)

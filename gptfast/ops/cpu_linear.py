"""The CPU decode linear on a panel-packed int8 weight with per-output-channel scales.

Motivation. A CPU decode step multiplies 1-8 rows of activations by each weight once: it is bound
by how fast the weight streams from memory and widens into the multiply. `torch._weight_int8pack_mm`,
PyTorch's int8-weight kernel, is vectorised only for bf16 activations and re-reads its weight rows
per output block. The kernel here (`csrc/cpu_linear.cpp`, the extension `gptfast._cpu`) reads the
weight once, as panels of 32 output columns laid out k-major:

    panels[p, k, c] = W[32 p + c, k]                                     (P = ceil(N / 32), pad 0)
    y[m, n]         = scale[n] * sum_k x[m, k] * panels[n // 32, k, n % 32] + bias[n]

For each k it loads the 32 weights of the panel's row k (32 bytes, one sequential stream per
panel, prefetched 2 KB ahead: the hardware prefetchers stop at each 4 KB page), widens them to fp32
in registers and adds x[m, k] times them into 32 accumulators per row of x, for up to 8 rows at
once (AVX-512F; AVX2 + FMA: 4; else portable C++, chosen at run time). Activations, products and
sums are fp32: quantisation stays weight-only, the activations are never rounded. Panels are split
between torch's intra-op threads (the same OpenMP runtime), and the GIL is released while it runs.

Measured on the development machine's AVX-512 Xeon against `torch._weight_int8pack_mm` on bf16
activations (its fastest mode), GPT-2 124M's decode shapes: 1.2-1.7x faster at 1-2 rows, 1.5-5x
at 8, ~1.7x at 32. All 49 int8 matmuls of a GPT-2 decode step after a cache flush stream 16.8 GB/s
(13.1 without the software prefetch). The kernel is generic over the weight type, but on fp32
weights it measured no faster than `F.linear` at 1 row or oneDNN's packed linear at 4-8 (see
`packed_linear`), so only int8 is built.

Each output's sum runs over k in order (one multiply-add per k), so the instruction sets differ
only in rounding (fused or unfused multiply-add), and a row's result does not depend on the rows
beside it or on the thread split. There is no Triton kernel: on CUDA the int8 matmul is
`quant_linear.int8_linear`. The reference is `F.linear` on the unpacked, dequantised weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch is imported first, so the extension's libgomp.so.1 is torch's own (see csrc/cpu_linear.cpp)
    from .. import _cpu
except ImportError:  # a source tree whose extensions were not built
    _cpu = None

AVAILABLE = _cpu is not None
PANEL = 32  # output columns per panel (csrc/cpu_linear.cpp: kPanel)
ISAS = ("auto", "portable", "avx2", "avx512")  # `isa` values; the index is the extension's code
WEIGHT_DTYPES = (torch.int8,)


def supported_isas() -> list[str]:
    """The instruction sets this CPU runs the kernel with (always "portable"), fastest last."""
    if _cpu is None:
        return []
    return [name for code, name in enumerate(ISAS) if code and _cpu.supports(code)]


def _need_extension() -> None:
    if _cpu is None:
        raise RuntimeError("gptfast._cpu is not built: reinstall gptfast (pip install -e .) to build its "
                           "C++ extensions")


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """The panel layout of a CPU weight (see the module docstring).

    Parameters
    ----------
    w : Tensor [N, K] int8, CPU

    Returns
    -------
    Tensor [ceil(N / 32), K, 32], w's dtype: panels[p, k, c] = w[32 p + c, k], 0 past row N - 1.
    """
    _need_extension()
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in WEIGHT_DTYPES or w.device.type != "cpu":
        raise ValueError(f"pack_panels takes a 2-D int8 CPU weight [N, K], got "
                         f"{getattr(w, 'dtype', type(w).__name__)} of shape {tuple(getattr(w, 'shape', ()))} "
                         f"on {getattr(w, 'device', None)}")
    N, K = w.shape
    if N == 0 or K == 0:
        raise ValueError(f"pack_panels: the weight is empty (shape {tuple(w.shape)})")
    src = w.detach().contiguous()
    out = torch.empty((-(-N // PANEL), K, PANEL), dtype=w.dtype)
    _cpu.pack_int8(src.data_ptr(), N, K, out.data_ptr())
    return out


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The weight [n, K] `panels` stands for (the inverse of `pack_panels`)."""
    P, K, C = panels.shape
    return panels.permute(0, 2, 1).reshape(P * C, K)[:n]


def _check(x, panels, n, scale, bias, out) -> None:
    if not isinstance(panels, torch.Tensor) or panels.dim() != 3 or panels.shape[2] != PANEL:
        raise ValueError(f"cpu_linear: panels must be [P, K, {PANEL}] (pack_panels), got "
                         f"{tuple(getattr(panels, 'shape', ()))}")
    P, K, _ = panels.shape
    if panels.dtype not in WEIGHT_DTYPES or not panels.is_contiguous():
        raise ValueError(f"cpu_linear: panels must be contiguous int8, got {panels.dtype}")
    if not 0 < n <= P * PANEL or n <= (P - 1) * PANEL:
        raise ValueError(f"cpu_linear: n = {n} does not match {P} panels of {PANEL} columns")
    if (x.dtype is not torch.float32 or x.dim() != 2 or x.shape[1] != K or x.stride(1) != 1
            or (x.shape[0] > 1 and x.stride(0) < K)):
        raise ValueError(f"cpu_linear: x must be fp32 [M, {K}] with unit column stride and rows apart, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if scale is None:
        raise ValueError("cpu_linear: int8 panels need their fp32 scales [n]")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.dtype is not torch.float32 or t.shape != (n,) or not t.is_contiguous()):
            raise ValueError(f"cpu_linear: {name} must be contiguous fp32 [{n}], got {t.dtype} {tuple(t.shape)}")
    if out is not None and (out.dtype is not torch.float32 or out.shape != (x.shape[0], n) or out.stride(1) != 1
                            or (x.shape[0] > 1 and out.stride(0) < n)):
        raise ValueError(f"cpu_linear: out must be fp32 [{x.shape[0]}, {n}] with unit column stride and rows "
                         f"apart, got "
                         f"{out.dtype} {tuple(out.shape)}")
    for name, t in (("x", x), ("panels", panels), ("scale", scale), ("bias", bias), ("out", out)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"cpu_linear: {name} must be on the CPU, got {t.device}")
    if out is not None:
        # threads write panels of `out` while others still read the inputs
        for name, t in (("x", x), ("panels", panels), ("scale", scale), ("bias", bias)):
            if t is not None and _overlap(out, t):
                raise ValueError(f"cpu_linear: out overlaps {name} in memory; pass a separate tensor")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of `a` and `b` (first to last element) intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def cpu_linear(x: torch.Tensor, panels: torch.Tensor, n: int, scale: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, isa: str = "auto", check: bool = True) -> torch.Tensor:
    """`x @ W.T * scale + bias` on the weight W [n, K] packed as `panels` (see the module docstring).

    Parameters
    ----------
    x : Tensor [M, K] fp32, CPU, unit column stride (any row stride)
    panels : Tensor [ceil(n / 32), K, 32] int8, from `pack_panels`
    n : int
        The weight's rows (output features).
    scale : Tensor [n] fp32
        Per-output-channel scales (W = panels * scale).
    bias : Tensor [n] fp32 or None
    out : Tensor [M, n] fp32 or None
        Written in place when given (unit column stride, any row stride).
    isa : "auto" or one of `supported_isas()`
        The instruction set; "auto" picks the fastest (tests compare them).
    check : bool
        Check every argument (the kernel reads raw pointers). False only for a caller that built
        each operand itself as required (`quant.int8_linear_cpu`, on the decode hot path: the
        checks cost ~7 us a call, ~0.35 ms of a ~10 ms GPT-2 int8 step).

    Returns
    -------
    Tensor [M, n] fp32 (`out` when given).
    """
    _need_extension()
    if check:
        _check(x, panels, n, scale, bias, out)
    if isa not in ISAS:
        raise ValueError(f"cpu_linear: isa must be one of {ISAS}, got {isa!r}")
    M, K = x.shape
    if out is None:
        out = torch.empty((M, n), dtype=torch.float32)
    _cpu.linear_int8(x.data_ptr(), x.stride(0) if M > 1 else K, panels.data_ptr(),
        scale.data_ptr(), bias.data_ptr() if bias is not None else 0,
        out.data_ptr(), out.stride(0) if M > 1 else n, M, n, K, torch.get_num_threads(), ISAS.index(isa))
    return out


def cpu_linear_ref(x: torch.Tensor, panels: torch.Tensor, n: int, scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   isa: str = "auto", check: bool = True) -> torch.Tensor:
    """Eager reference of `cpu_linear` (same signature; `isa` unused, the arguments always
    checked): `F.linear` in fp32 on the unpacked, dequantised weight."""
    _check(x, panels, n, scale, bias, out)
    w = unpack_panels(panels, n).float() * scale[:, None]
    y = F.linear(x, w, bias)
    return out.copy_(y) if out is not None else y

"""GPT-2's MLP activation fused with what precedes it: `bias_gelu_` (bias add + tanh-GELU, in
place; Triton) and `linear_gelu` (c_fc's GEMM + bias + GELU; cuBLASLt, not Triton).

Math::

    gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2 / pi) (u + 0.044715 u^3)))
                 = u * sigmoid(2 sqrt(2 / pi) (u + 0.044715 u^3))
    linear_gelu: out = gelu_tanh(x @ weight.T + bias)
    bias_gelu_:  y <- round(gelu_tanh(y + bias))           (in place, fp32 math)

Why fused: eager runs (c_fc GEMM with its bias, GELU) as three kernels at batch 1 (bias copy,
GEMM, GELU) and reads and writes the [N, 3072] activation once more for the GELU.

Ops and their floors (e = bytes per element):

- `linear_gelu`: no Triton GEMM. cuBLASLt's GELU_BIAS epilogue (reached through
  `torch._addmm_activation`) applies bias and tanh-GELU to the accumulator before the store, so
  the op is one GEMM at cuBLAS speed; a Triton GEMM would have to be tuned per GPU to match it,
  which cannot be done (or checked) without one. PyTorch does not take that path for a single
  row (batch-1 decode): there `linear_gelu` runs `torch.mm` (cuBLAS GEMV, no bias) and then
  `bias_gelu_` in place, 2 kernels instead of PyTorch's 3. Bytes: (N K + M K + M + N M) e, the
  weight dominating (4.7 MB for GPT-2's c_fc in bf16); FLOPs 2 N K M.
- `bias_gelu_`: grid `(N * cdiv(M, BLOCK_M),)`, one program per BLOCK_M columns of one row,
  fp32 math, rounded once. Bytes: (2 N M + M) e (y read and written, bias read). N=1, M=3072,
  bf16: 18 KB, pure launch latency; what it saves is a launch (~1-2 us inside a CUDA graph).

References: Hendrycks & Gimpel, "Gaussian Error Linear Units" (2016) for the tanh form GPT-2
uses; PyTorch aten/src/ATen/native/cuda/Blas.cpp (`addmm_out_cuda_impl`, `_addmm_activation`)
and torch/_decomp/decompositions.py for what `_addmm_activation` computes on each device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import FLOAT_DTYPES, check_rows, check_same_device, check_triton_device, check_vector
from .common import on_cuda

_GELU_BLOCK = 1024  # bias_gelu_: columns per program (M=3072: 3 programs per row)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _bias_gelu_kernel(
    y_ptr,  # [N, M] fp16/bf16/fp32, row stride stride_y, unit column stride; read and written
    b_ptr,  # [M] y's dtype, contiguous
    stride_y,
    M,
    BLOCK_M: tl.constexpr,
):
    # program p: row p // blocks_per_row, columns [BLOCK_M * (p % blocks_per_row), ...)
    pid = tl.program_id(0)
    blocks_per_row = tl.cdiv(M, BLOCK_M)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = cols < M
    ptrs = y_ptr + row * stride_y + cols  # y: [N, M], any row stride, unit column stride
    u = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    u = u + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # 0.5 u (1 + tanh(z)) == u * sigmoid(2 z): no cancellation in 1 + tanh(z) for negative u
    # (eager's form loses most bits there; this one stays within a few fp32 ulps).
    # NOTE: the limits match eager's: u -> -big gives -0.0 (exp overflows to inf), u = +inf
    # gives inf, u = -inf and NaN give NaN.
    z2 = 1.5957691216057308 * (u + 0.044715 * u * u * u)  # 2 sqrt(2/pi) (u + 0.044715 u^3)
    out = u / (1.0 + tl.exp(-z2))
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def bias_gelu_(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`y <- gelu_tanh(y + bias)` in place, in one pass (Triton); returns `y`.

    The sum and the GELU are computed in fp32 and rounded once to y's dtype. CUDA-graph
    capturable (the grid depends only on N and M). `linear_gelu` uses it after a bias-less GEMM
    when cuBLASLt's fused epilogue is not available (a single row).

    Parameters
    ----------
    y : Tensor [N, M]
        fp32/fp16/bf16; last dimension contiguous, any row stride. Overwritten.
    bias : Tensor [M]
        y's dtype, contiguous.

    Returns
    -------
    Tensor: `y` itself (same storage), holding the result.

    Examples
    --------
    >>> h = bias_gelu_(torch.mm(x, c_fc.weight.t()), c_fc.bias)
    """
    name = "bias_gelu_"
    check_rows(name, "y", y)
    N, M = y.shape
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: bias must be a torch.Tensor, got {type(bias).__name__}")
    check_vector(name, "bias", bias, M, y.dtype, dim="C")
    if N > 1 and M > 0 and y.stride(0) < M:  # e.g. an expand()ed row: in-place writes would race
        raise ValueError(f"{name}: y's rows overlap (row stride {y.stride(0)} < M={M}); "
                         "pass a tensor with distinct rows")
    device = check_same_device(name, y=y, bias=bias)
    check_triton_device(name, device)
    if N == 0 or M == 0:
        return y
    block_m = min(_GELU_BLOCK, triton.next_power_of_2(M))
    _bias_gelu_kernel[(N * triton.cdiv(M, block_m),)](
        y, bias, y.stride(0), M, BLOCK_M=block_m, num_warps=max(1, min(4, block_m // 256))
    )
    return y


def _linear_gelu_two_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`linear_gelu` as a bias-less GEMM and `bias_gelu_`: its CUDA path where cuBLASLt's
    epilogue is not taken. The GEMM output is rounded to the dtype before the bias is added."""
    return bias_gelu_(torch.mm(x, weight.t()), bias)  # (N, M)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`gelu_tanh(x @ weight.T + bias)`: on CUDA one cuBLASLt GEMM with a bias + GELU epilogue,
    or, for a single row, a GEMM and the `bias_gelu_` kernel.

    No Triton GEMM: cuBLASLt's GELU_BIAS epilogue already fuses both into the GEMM at cuBLAS
    speed, and a Triton GEMM competitive with it needs per-GPU tuning that cannot be done or
    checked off the GPU.

    CUDA with a bias: `torch._addmm_activation(bias, x, weight.t(), use_gelu=True)`. Its GELU is
    the tanh approximation on CUDA on every path PyTorch takes (aten/src/ATen/native/cuda/Blas.cpp,
    `addmm_out_cuda_impl`): the cuBLASLt GELU_BIAS epilogue when the inputs qualify, otherwise
    cuBLAS GEMM (bias copied into the output, beta = 1) followed by an in-place
    `gelu_(out, "tanh")`. PyTorch falls back (3 kernels: bias copy, GEMM, GELU, the same as
    eager) when N, K or M is 1 (`isInputCompliesAddmmCudaLt` asks for every size > 1:
    cuBLASLt's heuristic rejects a single row or column, so batch-1 decode takes it), when
    `DISABLE_ADDMM_CUDA_LT=1`, when cuBLASLt finds no algorithm, and on CUDA < 12.1 for 16-bit
    inputs that are not dense. For the size rule (N, K or M at most 1, 0 included) this function
    runs `torch.mm(x, weight.t())` and then `bias_gelu_` in place instead: 2 kernels. That rounds
    the GEMM output to the dtype before adding the bias in fp32 (the epilogue adds it to the fp32
    accumulator; PyTorch's fallback rounds `acc + bias`, then rounds again after the GELU): one
    extra rounding of the pre-activation, within the dtype's tolerance. The other fallbacks
    cannot be seen from here and keep PyTorch's 3 kernels. CPU: `_addmm_activation` applies the
    exact (erf) GELU there (torch/_decomp/decompositions.py says as much), which GPT-2 does not
    use, so the CPU path is the reference, as is a CUDA call without a bias (there is no
    epilogue to use).

    Parameters
    ----------
    x : Tensor [N, K]
        fp32/fp16/bf16.
    weight : Tensor [M, K]
        nn.Linear layout, x's dtype.
    bias : Tensor [M] or None
        x's dtype.

    Returns
    -------
    Tensor [N, M], x's dtype.

    Examples
    --------
    >>> h = linear_gelu(x, mlp.c_fc.weight, mlp.c_fc.bias)  # then c_proj
    """
    name = "linear_gelu"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        shown = f"{x.dtype} shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a 2-D [N, K] tensor of one of {FLOAT_DTYPES}, got {shown}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        shown = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be 2-D [M, K={x.shape[1]}] (nn.Linear layout), got {shown}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            shown = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{name}: bias must be None or 1-D [M={weight.shape[0]}], got {shown}")
        if bias.dtype != x.dtype:
            raise ValueError(f"{name}: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    device = check_same_device(name, x=x, weight=weight, bias=bias)
    if on_cuda(device) and bias is not None:
        # COMPAT(torch 2.13): the condition of PyTorch's non-Lt fallback on sizes (see above); batch-1 decode
        if min(x.shape[0], x.shape[1], weight.shape[0]) <= 1:
            return _linear_gelu_two_kernels(x, weight, bias)
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return linear_gelu_ref(x, weight, bias)


# --------------------------------------------------------------------------------------------
# references (eager PyTorch; the CPU path of the runtime)
# --------------------------------------------------------------------------------------------


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Eager reference of `linear_gelu` (same signature): `F.gelu(F.linear(x, weight, bias), approximate="tanh")`."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def bias_gelu_ref_(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Eager reference of `bias_gelu_` (same signature): `y <- gelu_tanh(y + bias)` computed in
    fp32 and rounded once, written into y, which is returned."""
    return y.copy_(F.gelu(y.float() + bias.float(), approximate="tanh").to(y.dtype))

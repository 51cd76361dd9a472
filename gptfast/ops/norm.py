"""The decode step's fused small ops: residual add + LayerNorm, embedding + LayerNorm, linear + GELU,
bias + GELU.

Math (C = embedding width; LN(s) over the last dimension, computed in fp32)::

    LN(s)          = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (biased variance)
    add_layernorm:   s = round(x + y + y_bias),            h = LN(s)
    embed_layernorm: s = round(wte[tokens] + wpe[positions]), h = LN(s)
    linear_gelu:     out = gelu_tanh(x @ weight.T + bias),
                     gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2 / pi) (u + 0.044715 u^3)))
                                  = u * sigmoid(2 sqrt(2 / pi) (u + 0.044715 u^3))
    bias_gelu_:      y <- round(gelu_tanh(y + bias))           (in place, fp32 math)

`round` is the cast to the inputs' dtype: `s` is the new residual stream, and `h` is computed
FROM THE ROUNDED `s`, like eager `s = x + y + b; F.layer_norm(s, ...)` in that dtype. The kernels
add in fp32 and round once; eager fp16/bf16 rounds after each add (`x + y`, then `+ b`), so the
two `s` may differ by one unit in the last place (the kernel's is the exactly rounded sum).

In GPT-2's decode step these replace, per block, (residual add, c_proj bias add, next LayerNorm)
by one `add_layernorm` (c_proj runs without its bias), (embedding, embedding, add, ln_1) by one
`embed_layernorm`, and (c_fc, GELU) by one `linear_gelu`: ~4 fewer launches per block, each
~1 us of DRAM time and launch gap.

Kernels and their floors (e = bytes per element):

- `add_layernorm`: grid `(cdiv(N, BLOCK_R),)`, each program holds BLOCK_R whole rows (BLOCK_C =
  next_power_of_2(C) lanes, masked), so the row is read once and both reductions (mean, then the
  centred variance: two passes over registers, not E[s^2] - mean^2) need no second DRAM pass.
  Small C packs several rows per program. Bytes: (4 N C + 3 C) e (read x, y; write s, h;
  y_bias, weight, bias once). N=256, C=768, bf16: 1.6 MB, ~0.5 us at 3 TB/s; batch 1 is launch
  latency (6 KB).
- `embed_layernorm`: the same, the two rows gathered by token and position id. Bytes:
  (4 N C + 2 C) e + 16 N (ids).
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

References: Ba et al., "Layer Normalization" (2016); Hendrycks & Gimpel, "Gaussian Error Linear
Units" (2016) for the tanh form GPT-2 uses; Triton tutorial 05 (layer norm) for the row-per-program
layout; PyTorch aten/src/ATen/native/cuda/Blas.cpp (`addmm_out_cuda_impl`, `_addmm_activation`)
and torch/_decomp/decompositions.py for what `_addmm_activation` computes on each device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .common import TOLERANCES, BenchCase, check_eps, check_vector, interpreting, lazy_generator, on_cuda

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_C = 16384  # one row lives in registers: 16384 fp32 lanes over 16 warps is 32 per thread
_MAX_ROWS = 16  # rows per program for small C
_ROW_ELEMENTS = 512  # small C: rows per program chosen so a program holds about this many lanes
_GELU_BLOCK = 1024  # bias_gelu_: columns per program (M=3072: 3 programs per row)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _layernorm_rows(s, mask_c, cols, w_ptr, b_ptr, C, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of the fp32 rows `s` [BLOCK_R, BLOCK_C] (masked lanes hold 0) -> fp32."""
    mean = tl.sum(s, 1) / C
    d = tl.where(mask_c[None, :], s - mean[:, None], 0.0)
    var = tl.sum(d * d, 1) / C
    h = d * tl.rsqrt(var + eps)[:, None]
    if HAS_W:
        h = h * tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return h


# NOTE: N changes from step to step and only bounds a mask: not specialised on (Triton would
# otherwise compile variants for N == 1, N % 16 == 0 and the rest, inside timed or captured runs).
@triton.jit(do_not_specialize=["N"])
def _add_layernorm_kernel(
    s_ptr,
    h_ptr,
    x_ptr,
    y_ptr,
    yb_ptr,
    w_ptr,
    b_ptr,
    stride_x,
    stride_y,
    N,
    C,
    eps,
    HAS_YB: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < N)[:, None] & mask_c[None, :]
    rows = rows.to(tl.int64)
    # x, y: [N, C], any row stride, unit column stride
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
    s = x.to(tl.float32) + y.to(tl.float32)
    if HAS_YB:
        s = s + tl.load(yb_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # NOTE: LN reads the rounded residual, exactly what the next block adds to
    s = s.to(s_ptr.dtype.element_ty)
    out = rows[:, None] * C + cols[None, :]  # s, h: [N, C] contiguous
    tl.store(s_ptr + out, s, mask=mask)
    h = _layernorm_rows(s.to(tl.float32), mask_c, cols, w_ptr, b_ptr, C, eps, HAS_W, HAS_B)
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _embed_layernorm_kernel(
    s_ptr,
    h_ptr,
    tok_ptr,
    pos_ptr,
    wte_ptr,
    wpe_ptr,
    w_ptr,
    b_ptr,
    stride_tok,
    stride_pos,
    stride_wte,
    stride_wpe,
    N,
    C,
    V,
    P,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask_r = rows < N
    mask_c = cols < C
    mask = mask_r[:, None] & mask_c[None, :]
    rows = rows.to(tl.int64)
    tok = tl.load(tok_ptr + rows * stride_tok, mask=mask_r, other=0)  # int64
    pos = tl.load(pos_ptr + rows * stride_pos, mask=mask_r, other=0)
    # NOTE: ids are validated by the caller; clamping keeps a bad id from faulting the device
    # (it reads the nearest row instead), at no measurable cost.
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)
    pos = tl.minimum(tl.maximum(pos, 0), P - 1)
    # wte: [V, C], wpe: [P, C], any row stride, unit column stride
    e = tl.load(wte_ptr + tok[:, None] * stride_wte + cols[None, :], mask=mask, other=0.0)
    p = tl.load(wpe_ptr + pos[:, None] * stride_wpe + cols[None, :], mask=mask, other=0.0)
    s = (e.to(tl.float32) + p.to(tl.float32)).to(s_ptr.dtype.element_ty)
    out = rows[:, None] * C + cols[None, :]  # s, h: [N, C] contiguous
    tl.store(s_ptr + out, s, mask=mask)
    h = _layernorm_rows(s.to(tl.float32), mask_c, cols, w_ptr, b_ptr, C, eps, HAS_W, HAS_B)
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_kernel(y_ptr, b_ptr, stride_y, M, BLOCK_M: tl.constexpr):
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


def _check_same_device(name: str, **tensors: torch.Tensor | None) -> torch.device:
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first, device = named[0][0], named[0][1].device
    for arg, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device; {first} is on {device}, {arg} on {t.device}")
    return device


def _check_launch_device(name: str, device: torch.device) -> None:
    if not on_cuda(device) and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got device {device}; use {name}_ref on the CPU"
        )


def _check_rows(name: str, arg: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """t: 2-D [rows, C] with a contiguous last dimension, one of _DTYPES (or `dtype`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: {arg} must be 2-D [rows, C], got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in _DTYPES:
        raise ValueError(f"{name}: {arg} dtype must be one of {_DTYPES}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: {arg} dtype {t.dtype} differs from the first input's dtype {dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: {arg}'s last dimension must be contiguous (stride 1), got strides {t.stride()}")


def _check_width(name: str, C: int) -> None:
    if not 1 <= C <= _MAX_C:
        raise ValueError(f"{name}: C (the last dimension) must be in 1..{_MAX_C}, got {C}")


def _row_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): whole rows per program, ~256 lanes per warp.

    C=768: one row, 1024 lanes, 4 warps; C=1600: 2048 lanes, 8 warps; C=96: 4 rows of 128, 2 warps.
    """
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(_MAX_ROWS, _ROW_ELEMENTS // block_c))
    num_warps = min(16, max(1, block_r * block_c // 256))
    return block_r, block_c, num_warps


def add_layernorm(
    x: torch.Tensor,
    y: torch.Tensor,
    y_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and LayerNorm in one pass: `s = x + y + y_bias`, `h = LayerNorm(s)` (Triton).

    The sum is taken in fp32 and rounded once to x's dtype; `h` is the LayerNorm (fp32 math) of
    that rounded `s`. CUDA-graph capturable (the grid depends only on N and C).

    Parameters
    ----------
    x, y : Tensor [N, C]
        fp32/fp16/bf16, one dtype; last dimension contiguous, any row stride (each its own).
    y_bias : Tensor [C] or None
        Added to y (e.g. the bias of the projection that produced y, run without it).
    weight, bias : Tensor [C] or None
        The LayerNorm's affine terms; None leaves that term out.
    eps : float
        Added to the variance, >= 0.

    Returns
    -------
    s, h : Tensor [N, C], x's dtype, contiguous (new tensors).

    Examples
    --------
    >>> x, h = add_layernorm(x, attn_out, c_proj.bias, ln_2.weight, ln_2.bias, 1e-5)
    """
    name = "add_layernorm"
    _check_rows(name, "x", x)
    _check_rows(name, "y", y, x.dtype)
    if y.shape != x.shape:
        raise ValueError(f"{name}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    N, C = x.shape
    _check_width(name, C)
    for arg, t in (("y_bias", y_bias), ("weight", weight), ("bias", bias)):
        check_vector(name, arg, t, C, x.dtype, dim="C")
    eps = check_eps(name, eps)
    device = _check_same_device(name, x=x, y=y, y_bias=y_bias, weight=weight, bias=bias)
    _check_launch_device(name, device)
    s = torch.empty((N, C), dtype=x.dtype, device=device)
    h = torch.empty((N, C), dtype=x.dtype, device=device)
    if N == 0:
        return s, h
    block_r, block_c, num_warps = _row_config(C)
    _add_layernorm_kernel[(triton.cdiv(N, block_r),)](
        s, h, x, y,
        x if y_bias is None else y_bias,  # unused pointer when absent
        x if weight is None else weight,
        x if bias is None else bias,
        x.stride(0), y.stride(0), N, C, eps,
        HAS_YB=y_bias is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return s, h


def embed_layernorm(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token + position embedding and LayerNorm in one pass (Triton).

    `s = wte[tokens] + wpe[positions]` (fp32 add, rounded once to wte's dtype), `h = LayerNorm(s)`.
    CUDA-graph capturable. Ids must lie in `[0, V)` and `[0, P)`: the caller validates them (the
    runtime does, before the step). The kernel clamps an out-of-range id to the nearest valid row
    rather than reading out of bounds; the reference raises as `F.embedding` does.

    Parameters
    ----------
    tokens, positions : Tensor [N], int64
        Token ids and their positions (any stride).
    wte : Tensor [V, C]
        Token embeddings, fp32/fp16/bf16, last dimension contiguous.
    wpe : Tensor [P, C]
        Position embeddings, wte's dtype, last dimension contiguous.
    weight, bias : Tensor [C] or None
        The LayerNorm's affine terms (e.g. block 0's ln_1); None leaves that term out.
    eps : float
        Added to the variance, >= 0.

    Returns
    -------
    s, h : Tensor [N, C], wte's dtype, contiguous (new tensors).

    Examples
    --------
    >>> x, h = embed_layernorm(tokens, positions, wte, wpe, ln_1.weight, ln_1.bias, 1e-5)
    """
    name = "embed_layernorm"
    for arg, t in (("tokens", tokens), ("positions", positions)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            shown = f"{t.dtype} shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a 1-D int64 tensor [N], got {shown}")
    if positions.shape != tokens.shape:
        raise ValueError(f"{name}: positions must have tokens' shape {tuple(tokens.shape)}, got {tuple(positions.shape)}")
    _check_rows(name, "wte", wte)
    _check_rows(name, "wpe", wpe, wte.dtype)
    V, C = wte.shape
    P = wpe.shape[0]
    if wpe.shape[1] != C:
        raise ValueError(f"{name}: wpe must be [P, C={C}] like wte {tuple(wte.shape)}, got {tuple(wpe.shape)}")
    if V < 1 or P < 1:
        raise ValueError(f"{name}: wte and wpe need at least one row, got {tuple(wte.shape)} and {tuple(wpe.shape)}")
    _check_width(name, C)
    for arg, t in (("weight", weight), ("bias", bias)):
        check_vector(name, arg, t, C, wte.dtype, dim="C")
    eps = check_eps(name, eps)
    device = _check_same_device(name, tokens=tokens, positions=positions, wte=wte, wpe=wpe, weight=weight, bias=bias)
    _check_launch_device(name, device)
    N = tokens.shape[0]
    s = torch.empty((N, C), dtype=wte.dtype, device=device)
    h = torch.empty((N, C), dtype=wte.dtype, device=device)
    if N == 0:
        return s, h
    block_r, block_c, num_warps = _row_config(C)
    _embed_layernorm_kernel[(triton.cdiv(N, block_r),)](
        s, h, tokens, positions, wte, wpe,
        wte if weight is None else weight,  # unused pointer when absent
        wte if bias is None else bias,
        tokens.stride(0), positions.stride(0), wte.stride(0), wpe.stride(0),
        N, C, V, P, eps,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return s, h


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
    _check_rows(name, "y", y)
    N, M = y.shape
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: bias must be a torch.Tensor, got {type(bias).__name__}")
    check_vector(name, "bias", bias, M, y.dtype, dim="C")
    if N > 1 and M > 0 and y.stride(0) < M:  # e.g. an expand()ed row: in-place writes would race
        raise ValueError(f"{name}: y's rows overlap (row stride {y.stride(0)} < M={M}); pass a tensor with distinct rows")
    device = _check_same_device(name, y=y, bias=bias)
    _check_launch_device(name, device)
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
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _DTYPES:
        shown = f"{x.dtype} shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a 2-D [N, K] tensor of one of {_DTYPES}, got {shown}")
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
    device = _check_same_device(name, x=x, weight=weight, bias=bias)
    if on_cuda(device) and bias is not None:
        # NOTE: the condition of PyTorch's non-Lt fallback on sizes (see above); batch-1 decode
        if min(x.shape[0], x.shape[1], weight.shape[0]) <= 1:
            return _linear_gelu_two_kernels(x, weight, bias)
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return linear_gelu_ref(x, weight, bias)


# --------------------------------------------------------------------------------------------
# references (eager PyTorch; the CPU path of the runtime)
# --------------------------------------------------------------------------------------------


def add_layernorm_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    y_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `add_layernorm` (same signature): `s = x + y (+ y_bias)`, then
    `F.layer_norm(s)`. In fp16/bf16 eager rounds after each add (the kernel once)."""
    s = x + y
    if y_bias is not None:
        s = s + y_bias
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def embed_layernorm_ref(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `embed_layernorm` (same signature): two `F.embedding`s, add, `F.layer_norm`.
    Out-of-range ids raise (CPU) or assert on the device (CUDA)."""
    s = F.embedding(tokens, wte) + F.embedding(positions, wpe)
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Eager reference of `linear_gelu` (same signature): `F.gelu(F.linear(x, weight, bias), approximate="tanh")`."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def bias_gelu__ref(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Eager reference of `bias_gelu_` (same signature): `y <- gelu_tanh(y + bias)` computed in
    fp32 and rounded once, written into y, which is returned."""
    return y.copy_(F.gelu(y.float() + bias.float(), approximate="tanh").to(y.dtype))


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------



def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ln_params(C: int, dtype, device, g) -> tuple[torch.Tensor, torch.Tensor]:
    weight = (1 + 0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
    bias = (0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
    return weight, bias


def _add_layernorm_case(device, N, C, dtype) -> BenchCase:
    """The decode step's residual add: x the residual, y a projection's output, y_bias its bias."""
    gen = lazy_generator(device, 1000 + N + C)

    def make_args():
        g = gen()
        x = torch.randn(N, C, generator=g, device=device).to(dtype)
        y = torch.randn(N, C, generator=g, device=device).to(dtype)
        y_bias = (0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
        return (x, y, y_bias, *_ln_params(C, dtype, device, g), 1e-5)

    def layer_norm_alone(x, y, y_bias, weight, bias, eps):
        return F.layer_norm(x, (C,), weight, bias, eps)

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="add_layernorm",
        label=f"N={N} C={C} {_dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(4 * N * C + 3 * C) * e,
        params=dict(N=N, C=C, dtype=str(dtype)),
        baselines={"layer_norm alone": layer_norm_alone},
        **TOLERANCES[dtype],
    )


def _embed_layernorm_case(device, N, C, V, P, dtype) -> BenchCase:
    gen = lazy_generator(device, 2000 + N + C)

    def make_args():
        g = gen()
        tokens = torch.randint(0, V, (N,), generator=g, device=device)
        positions = torch.randint(0, P, (N,), generator=g, device=device)
        wte = (0.1 * torch.randn(V, C, generator=g, device=device)).to(dtype)
        wpe = (0.1 * torch.randn(P, C, generator=g, device=device)).to(dtype)
        return (tokens, positions, wte, wpe, *_ln_params(C, dtype, device, g), 1e-5)

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="embed_layernorm",
        label=f"N={N} C={C} V={V} P={P} {_dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(4 * N * C + 2 * C) * e + 16 * N,
        params=dict(N=N, C=C, V=V, P=P, dtype=str(dtype)),
        **TOLERANCES[dtype],
    )


def _linear_gelu_case(device, N, K, M, dtype) -> BenchCase:
    """GPT-2's c_fc. Baselines: the GEMM alone (what the fused GELU costs), and at N=1 the GEMM
    on x padded to 2 rows (cuBLASLt rejects one row; this measures whether padding would pay)
    and `_addmm_activation` itself (PyTorch's 3-kernel fallback, which mm + bias_gelu_ replaces)."""
    gen = lazy_generator(device, 3000 + N + K + M)

    def make_args():
        g = gen()
        x = torch.randn(N, K, generator=g, device=device).to(dtype)
        weight = (0.02 * torch.randn(M, K, generator=g, device=device)).to(dtype)  # GPT-2's init scale
        bias = (0.1 * torch.randn(M, generator=g, device=device)).to(dtype)
        return (x, weight, bias)

    def linear_alone(x, weight, bias):
        return F.linear(x, weight, bias)

    baselines = {"linear alone": linear_alone}
    if N == 1:

        def padded_to_2_rows(x, weight, bias):
            x2 = x.expand(2, K)  # addmm copies it to a dense [2, K]: one tiny copy kernel
            return torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)[:1]

        def addmm_activation(x, weight, bias):  # the 1-row path before bias_gelu_: 3 kernels
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)

        if device.startswith("cuda"):  # on the CPU _addmm_activation is another function (erf GELU)
            baselines["2-row pad"] = padded_to_2_rows
            baselines["_addmm_activation"] = addmm_activation

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="linear_gelu",
        label=f"N={N} K={K} M={M} {_dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(N * K + M * K + M + N * M) * e,
        flops=2 * N * K * M,
        params=dict(N=N, K=K, M=M, dtype=str(dtype)),
        baselines=baselines,
        **TOLERANCES[dtype],
    )


def _bias_gelu_case(device, N, M, dtype) -> BenchCase:
    """c_fc's bias + GELU after a bias-less GEMM. Baseline: eager `F.gelu(y + bias)` in the dtype
    (2 kernels, out of place; PyTorch's fallback does the add inside the GEMM instead)."""
    gen = lazy_generator(device, 4000 + N + M)

    def make_args():
        g = gen()
        y = torch.randn(N, M, generator=g, device=device).to(dtype)
        bias = (0.1 * torch.randn(M, generator=g, device=device)).to(dtype)
        return (y, bias)

    def add_then_gelu(y, bias):
        return F.gelu(y + bias, approximate="tanh")

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="bias_gelu_",
        label=f"N={N} M={M} {_dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(2 * N * M + M) * e,
        params=dict(N=N, M=M, dtype=str(dtype)),
        baselines={"add + gelu": add_then_gelu},
        **TOLERANCES[dtype],
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """The decode step's fused ops at GPT-2 sizes (C=768; 1600 is gpt2-xl).

    add_layernorm: N in {1, 64, 256} (quick {1, 256}), C in {768, 1600}, bf16 and fp16 (quick:
    fp16 at one point); bytes = x, y read + s, h written + three [C] vectors; baseline "layer_norm
    alone" = F.layer_norm on x (one eager kernel of the same size: the fused op's target).
    embed_layernorm: N in {1, 256}, C=768, V=50257, P=1024; bytes = the gathered rows + outputs +
    ids. linear_gelu: c_fc, N in {1, 64, 256}, K=768, M=3072; bytes dominated by the weight,
    FLOPs 2 N K M; baselines "linear alone" and, at N=1, "2-row pad" and "_addmm_activation"
    (the old 1-row path). bias_gelu_: N in {1, 256}, M=3072 (full: fp16 too); bytes = y read and
    written + bias; baseline "add + gelu". The eager reference is the unfused eager sequence each
    op replaces. cpu: one tiny fp32 case of each.
    """
    if device == "cpu":
        return [
            _add_layernorm_case("cpu", 5, 96, torch.float32),
            _embed_layernorm_case("cpu", 5, 96, 50, 20, torch.float32),
            _linear_gelu_case("cpu", 3, 32, 96, torch.float32),
            _bias_gelu_case("cpu", 3, 100, torch.float32),
        ]
    fp16, bf16 = torch.float16, torch.bfloat16
    if quick:
        add = [(n, c, bf16) for c in (768, 1600) for n in (1, 256)] + [(256, 768, fp16)]
        embed = [(1, bf16), (256, bf16)]
        gelu = [(1, bf16), (64, bf16), (256, bf16)]
        bias_gelu = [(1, bf16), (256, bf16)]
    else:
        add = [(n, c, dt) for dt in (bf16, fp16) for c in (768, 1600) for n in (1, 64, 256)]
        embed = [(n, dt) for dt in (bf16, fp16) for n in (1, 256)]
        gelu = [(n, bf16) for n in (1, 64, 256)] + [(256, fp16)]
        bias_gelu = [(n, dt) for dt in (bf16, fp16) for n in (1, 256)]
    cases = [_add_layernorm_case(device, n, c, dt) for n, c, dt in add]
    cases += [_embed_layernorm_case(device, n, 768, 50257, 1024, dt) for n, dt in embed]
    cases += [_linear_gelu_case(device, n, 768, 3072, dt) for n, dt in gelu]
    cases += [_bias_gelu_case(device, n, 3072, dt) for n, dt in bias_gelu]
    return cases

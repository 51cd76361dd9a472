"""LayerNorm fused with what precedes it in GPT-2's step: `add_layernorm` (residual add +
LayerNorm) and `embed_layernorm` (token + position embedding + LayerNorm).

Math (C = embedding width; LN(s) over the last dimension, computed in fp32)::

    LN(s)          = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (biased variance)
    add_layernorm:   s = round(x + y + y_bias),            h = LN(s)
    embed_layernorm: s = round(wte[tokens] + wpe[positions]), h = LN(s)

`round` is the cast to the inputs' dtype: `s` is the new residual stream, and `h` is computed
FROM THE ROUNDED `s`, like eager `s = x + y + b; F.layer_norm(s, ...)` in that dtype. The kernels
add in fp32 and round once; eager fp16/bf16 rounds after each add (`x + y`, then `+ b`), so the
two `s` may differ by one unit in the last place (the kernel's is the exactly rounded sum).

Why fused: in GPT-2's decode step these replace, per block, (residual add, c_proj bias add, next
LayerNorm) by one `add_layernorm` (c_proj runs without its bias) and (embedding, embedding, add,
ln_1) by one `embed_layernorm`: fewer launches, each ~1 us of DRAM time and launch gap, and the
sum is read back from registers instead of DRAM.

Kernels and their floors (e = bytes per element):

- `add_layernorm`: grid `(cdiv(N, BLOCK_R),)`, each program holds BLOCK_R whole rows (BLOCK_C =
  next_power_of_2(C) lanes, masked), so the row is read once and both reductions (mean, then the
  centred variance: two passes over registers, not E[s^2] - mean^2) need no second DRAM pass.
  Small C packs several rows per program. Bytes: (4 N C + 3 C) e (read x, y; write s, h;
  y_bias, weight, bias once). N=256, C=768, bf16: 1.6 MB, ~0.5 us at 3 TB/s; batch 1 is launch
  latency (6 KB).
- `embed_layernorm`: the same, the two rows gathered by token and position id. Bytes:
  (4 N C + 2 C) e + 16 N (ids).

References: Ba et al., "Layer Normalization" (2016); Triton tutorial 05 (layer norm) for the
row-per-program layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_eps, check_rows, check_same_device, check_triton_device, check_vector

_MAX_C = 16384  # one row lives in registers: 16384 fp32 lanes over 16 warps is 32 per thread
_MAX_ROWS = 16  # rows per program for small C
_ROW_ELEMENTS = 512  # small C: rows per program chosen so a program holds about this many lanes


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _layernorm_rows(
    s,
    mask_c,
    cols,
    w_ptr,  # [C] fp16/bf16/fp32, contiguous; read when HAS_W
    b_ptr,  # [C] w's dtype, contiguous; read when HAS_B
    C,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
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
    s_ptr,  # [N, C] x's dtype, contiguous; written (the new residual stream)
    h_ptr,  # [N, C] x's dtype, contiguous; written (LN(s))
    x_ptr,  # [N, C] fp16/bf16/fp32, row stride stride_x, unit column stride
    y_ptr,  # [N, C] x's dtype, row stride stride_y, unit column stride
    yb_ptr,  # [C] x's dtype, contiguous; read when HAS_YB
    w_ptr,  # [C] x's dtype, contiguous; read when HAS_W
    b_ptr,  # [C] x's dtype, contiguous; read when HAS_B
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
    s_ptr,  # [N, C] wte's dtype, contiguous; written (the new residual stream)
    h_ptr,  # [N, C] wte's dtype, contiguous; written (LN(s))
    tok_ptr,  # [N] int64 token ids, stride stride_tok
    pos_ptr,  # [N] int64 positions, stride stride_pos
    wte_ptr,  # [V, C] fp16/bf16/fp32, row stride stride_wte, unit column stride
    wpe_ptr,  # [P, C] wte's dtype, row stride stride_wpe, unit column stride
    w_ptr,  # [C] wte's dtype, contiguous; read when HAS_W
    b_ptr,  # [C] wte's dtype, contiguous; read when HAS_B
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


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


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
    check_rows(name, "x", x)
    check_rows(name, "y", y, dtype=x.dtype)
    if y.shape != x.shape:
        raise ValueError(f"{name}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    N, C = x.shape
    _check_width(name, C)
    for arg, t in (("y_bias", y_bias), ("weight", weight), ("bias", bias)):
        check_vector(name, arg, t, C, x.dtype, dim="C")
    eps = check_eps(name, eps)
    device = check_same_device(name, x=x, y=y, y_bias=y_bias, weight=weight, bias=bias)
    check_triton_device(name, device)
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
        raise ValueError(f"{name}: positions must have tokens' shape {tuple(tokens.shape)}, "
                         f"got {tuple(positions.shape)}")
    check_rows(name, "wte", wte)
    check_rows(name, "wpe", wpe, dtype=wte.dtype)
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
    device = check_same_device(name, tokens=tokens, positions=positions, wte=wte, wpe=wpe, weight=weight, bias=bias)
    check_triton_device(name, device)
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

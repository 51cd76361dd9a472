"""LayerNorm -> linear (+ bias, + GELU) for 1-8 rows in one kernel; optionally with the token +
position embedding in front (the first block's QKV projection).

Math (x: [R, K] rows, W: [N, K] nn.Linear layout, LN over K in fp32 with the biased variance)::

    layernorm_linear:        h = round(LN(x)),                       out = act(h @ W^T + b)
    embed_layernorm_linear:  s = round(wte[tokens] + wpe[positions]), h = round(LN(s)),
                             out = h @ W^T + b                        (returns out and s)

`round` is the cast to x's dtype, as in the unfused sequence (`add_layernorm`/`embed_layernorm`
write h in the model dtype, then the GEMM reads it); `act` is the identity or tanh-GELU, applied
to the fp32 accumulator plus bias, rounded once to the output dtype (x's, or `out_dtype`).

In GPT-2's small-batch decode step (the model's `_GemvStages`) this op is, per block, ln_1 ->
c_attn (+ bias) [K1] and ln_2 -> c_fc + bias + GELU [K4]; `embed_layernorm_linear` is block 0's
K1 with the embedding gathered in its prologue (no separate embedding kernel); and the final ln_f
-> LM head writing fp32 logits (no separate cast) is `layernorm_linear` without a bias.

The kernel has a third mode, ARGMAX, used by `head_argmax`: instead of storing the outputs each
program reduces its columns to a per-row (max, lowest column of the max, NaN/inf flags) partial.

Kernel: grid `(cdiv(N, BLOCK_N), cdiv(R, BLOCK_R))` (see `gemv.blocks`). Each program computes the
LN statistics of its rows (2 passes over K, L1/L2), then walks K in BLOCK_K tiles: normalises the
x tile, loads the `[BLOCK_N, BLOCK_K]` weight tile, accumulates in fp32; epilogue bias, GELU,
store. With the embedding, x is gathered from wte/wpe by id, and the programs of column block 0
also store s (the residual stream the block adds to).

Bytes (e = element size): N K e (the weight, read once, the floor) + N e (bias) + R N e_out
(output) + R K e (x; read by every program, from L2 after the first) + 2 K e (LN affine).
GPT-2 124M, bf16, R=1: c_attn 3.5 MB, c_fc 4.7 MB, the head 77 MB (at 4.8 TB/s: 0.74, 0.98,
16 us). FLOPs 2 R N K: ~1 FLOP per weight byte at R=1, bandwidth-bound for every R <= 8.

References: Triton tutorial 05 (layer norm) for the row statistics; the split-N GEMV layout of
Liger-Kernel's and FlashInfer's decode GEMVs (outputs across programs, K walked by each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gemv
from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import FLOAT_DTYPES, check_eps, check_launch_device, check_rows, check_vector
from .gemv import gelu_tanh, row_stats
from .layernorm import embed_layernorm_ref

# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


# NOTE: R (the batch) bounds a mask only: not specialised on, so batch sizes share a variant.
@triton.jit(do_not_specialize=["R"])
def _ln_linear_kernel(
    out_ptr,  # [R, N] out dtype, row stride stride_out; with ARGMAX the fp32 partial maxima [R, column blocks]
    idx_ptr,  # [R, column blocks] int32, row stride stride_out: partial argmax columns; written when ARGMAX
    flag_ptr,  # [R, column blocks] int32, row stride stride_out: partial NaN/finite flags; written when ARGMAX
    s_ptr,  # [R, K] x's dtype, contiguous: round(wte[tok] + wpe[pos]); written when EMBED
    x_ptr,  # [R, K] fp16/bf16/fp32, row stride stride_x, unit column stride; with EMBED wte [V, K]
    tok_ptr,  # [R] int64 token ids; read when EMBED
    pos_ptr,  # [R] int64 positions; read when EMBED
    wpe_ptr,  # [P, K] x's dtype, row stride stride_wpe, unit column stride; read when EMBED
    lnw_ptr,  # [K] x's dtype, contiguous; read when HAS_LNW
    lnb_ptr,  # [K] x's dtype, contiguous; read when HAS_LNB
    w_ptr,  # [N, K] x's dtype (nn.Linear layout), row stride stride_w, unit column stride
    b_ptr,  # [N] x's dtype, contiguous; read when HAS_BIAS
    stride_out,
    stride_x,
    stride_wpe,
    stride_w,
    R,
    N,
    K,
    V,
    P,
    eps,
    EMBED: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_LNW: tl.constexpr,
    HAS_LNB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    rows = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if EMBED:
        # x_ptr is wte [V, K] (row stride stride_x): rows gathered by token id, plus wpe by position.
        # NOTE: ids are validated by the caller; clamping keeps a bad id from faulting the device.
        tok = tl.load(tok_ptr + rows, mask=mask_r, other=0)
        pos = tl.load(pos_ptr + rows, mask=mask_r, other=0)
        x_rows = x_ptr + tl.minimum(tl.maximum(tok, 0), V - 1)[:, None] * stride_x  # [BLOCK_R, 1]
        p_rows = wpe_ptr + tl.minimum(tl.maximum(pos, 0), P - 1)[:, None] * stride_wpe
        # s = round(wte + wpe), stored by column block 0 and read back (from L1/L2) for the stats
        s_rows = s_ptr + rows[:, None] * K  # s: [R, K] contiguous
        if pid_n == 0:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                m = mask_r[:, None] & (k < K)[None, :]
                e = tl.load(x_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
                e += tl.load(p_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
                tl.store(s_rows + k[None, :], e.to(s_ptr.dtype.element_ty), mask=m)
    else:
        x_rows = x_ptr + rows[:, None] * stride_x  # x: [R, K], any row stride
    if HAS_LN:
        if EMBED:
            # every program recomputes s in fp32 and rounds it like the stored copy: no wait on
            # column block 0, and the statistics are those of exactly the stored values
            mean, rstd = _embed_stats(x_rows, p_rows, mask_r, K, eps, s_ptr.dtype.element_ty, BLOCK_R, BLOCK_K)
        else:
            mean, rstd = row_stats(x_rows, mask_r, K, eps, BLOCK_R, BLOCK_K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w  # W: [N, K], rows contiguous along K
    # NOTE: products are summed over K once, after the loop: the loop body is loads and FMAs
    # only (no cross-lane shuffles per tile), so consecutive tiles' loads can be in flight together
    acc3 = tl.zeros([BLOCK_R, BLOCK_N, BLOCK_K], dtype=tl.float32)
    # unrolled: ptxas then issues two tiles' weight loads before their FMAs (the loop is not
    # software-pipelined through shared memory; sm_90 SASS checked)
    for k0 in tl.range(0, K, BLOCK_K, loop_unroll_factor=2):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        m = mask_r[:, None] & mask_k[None, :]
        x = tl.load(x_rows + k[None, :], mask=m, other=0.0)
        if EMBED:
            pos_emb = tl.load(p_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) + pos_emb).to(s_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        if HAS_LN:
            # NOTE: inline, not a helper: the interpreter pays a few ms per nested jit call
            h = (x - mean[:, None]) * rstd[:, None]
            if HAS_LNW:
                h = h * tl.load(lnw_ptr + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            if HAS_LNB:
                h = h + tl.load(lnb_ptr + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            # rounded to the input dtype: the GEMM reads what the unfused LayerNorm would write
            x = tl.where(m, h.to(w_ptr.dtype.element_ty).to(tl.float32), 0.0)
        acc3 += x[:, None, :] * w.to(tl.float32)[None, :, :]  # fp32 FMAs, no tensor cores
    acc = tl.sum(acc3, 2)  # [BLOCK_R, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu_tanh(acc)
    if ARGMAX:
        # this program's share of a greedy argmax over the logits as the full path would store
        # them (rounded to the weights' dtype); partials [R, programs] at column pid_n
        valid = mask_r[:, None] & mask_n[None, :]
        vals = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        bad = valid & ((vals != vals) | (vals == float("inf")))  # NaN or +inf: the row is flagged
        finite = valid & (vals > float("-inf")) & (vals < float("inf"))
        vals = tl.where(valid & (vals == vals), vals, float("-inf"))
        best = tl.max(vals, 1)  # [BLOCK_R]
        # the lowest column holding the max (ties go to the lowest id)
        best_col = tl.min(tl.where(valid & (vals == best[:, None]), offs_n[None, :], 2147483647), 1)
        flags = tl.max(bad.to(tl.int32), 1) + 2 * tl.max(finite.to(tl.int32), 1)
        part = rows * stride_out + pid_n  # [BLOCK_R]
        tl.store(out_ptr + part, best, mask=mask_r)
        tl.store(idx_ptr + part, best_col, mask=mask_r)
        tl.store(flag_ptr + part, flags, mask=mask_r)
    else:
        out = out_ptr + rows[:, None] * stride_out + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])


@triton.jit
def _embed_stats(
    x_rows,  # [BLOCK_R, 1] pointers to the rows of wte [V, K] gathered by token id
    p_rows,  # [BLOCK_R, 1] pointers to the rows of wpe [P, K] gathered by position
    mask_r,
    K,
    eps,
    S_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`gemv.row_stats` of s = round(wte row + wpe row), gathered twice (L1/L2)."""
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        m = mask_r[:, None] & (k < K)[None, :]
        e = tl.load(x_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
        e = (e + tl.load(p_rows + k[None, :], mask=m, other=0.0).to(tl.float32)).to(S_DTYPE)
        total += tl.sum(e.to(tl.float32), 1)
    mean = total / K
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        m = mask_r[:, None] & (k < K)[None, :]
        e = tl.load(x_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
        e = (e + tl.load(p_rows + k[None, :], mask=m, other=0.0).to(tl.float32)).to(S_DTYPE)
        d = e.to(tl.float32) - mean[:, None]
        sq += tl.sum(tl.where(m, d * d, 0.0), 1)
    return mean, tl.rsqrt(sq / K + eps)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _check_linear(name: str, K: int, dtype, weight, bias) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        shown = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be 2-D [N, K={K}] (nn.Linear layout), got {shown}")
    if weight.dtype != dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} differs from the input's dtype {dtype}")
    if K > 1 and weight.stride(1) != 1:
        raise ValueError(f"{name}: weight rows must be contiguous (stride 1 along K), got strides {weight.stride()}")
    N = weight.shape[0]
    check_vector(name, "bias", bias, N, dtype)
    return N


def _check_out_dtype(name: str, out_dtype, dtype) -> torch.dtype:
    if out_dtype is None:
        return dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be None or one of {FLOAT_DTYPES}, got {out_dtype!r}")
    return out_dtype


def _check_out(name: str, out, R: int, N: int, dtype, device) -> torch.Tensor:
    """`out` checked (the [R, N] output, last dimension contiguous), or a new contiguous one."""
    if out is None:
        return torch.empty((R, N), dtype=dtype, device=device)
    if (not isinstance(out, torch.Tensor) or out.shape != (R, N) or out.dtype != dtype or out.device != device
            or (N > 1 and out.stride(1) != 1)):
        got = (tuple(out.shape), out.dtype, str(out.device), out.stride()) if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise ValueError(f"{name}: out must be an [R, N] = ({R}, {N}) {dtype} tensor on {device} with its last "
                         f"dimension contiguous, got (shape, dtype, device, strides) {got}")
    return out


def column_blocks(R: int, N: int, K: int, device: torch.device) -> int:
    """Programs along the output columns of a launch: `head_argmax` sizes its partials by it."""
    return triton.cdiv(N, gemv.blocks(R, N, K, device)[1])


def launch(out, s, x, tok, pos, wpe, ln_weight, ln_bias, weight, bias, eps, embed, gelu, R, K,
           argmax=None):
    """Launch `_ln_linear_kernel` (shared with `head_argmax`, whose `argmax` = (index, flag)
    partials turns `out` into the partial maxima [R, column_blocks], row stride = column_blocks)."""
    N = weight.shape[0]
    block_r, block_n, block_k = gemv.blocks(R, N, K, x.device)
    idx, flag = (out, out) if argmax is None else argmax
    _ln_linear_kernel[(triton.cdiv(N, block_n), triton.cdiv(R, block_r))](
        out, idx, flag, s, x, tok, pos, wpe,
        x if ln_weight is None else ln_weight,  # unused pointers when absent
        x if ln_bias is None else ln_bias,
        weight,
        x if bias is None else bias,
        out.stride(0), x.stride(0), wpe.stride(0), weight.stride(0),
        R, N, K, x.shape[0] if embed else 1, wpe.shape[0] if embed else 1, eps,
        EMBED=embed,
        HAS_LN=True,
        HAS_LNW=ln_weight is not None,
        HAS_LNB=ln_bias is not None,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        ARGMAX=argmax is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )  # fmt: skip


def layernorm_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`act(LayerNorm(x) @ weight.T + bias)` in one kernel, for a few rows (Triton).

    CUDA-graph capturable (grid from shapes only). Meant for 1-8 rows (the weight is read once
    per 8 rows); more rows work, in more row blocks.

    Parameters
    ----------
    x : Tensor [R, K]
        fp32/fp16/bf16, last dimension contiguous, any row stride.
    ln_weight, ln_bias : Tensor [K] or None
        The LayerNorm's affine terms, x's dtype; None leaves that term out.
    eps : float
        Added to the variance, >= 0.
    weight : Tensor [N, K]
        nn.Linear layout, x's dtype, rows contiguous.
    bias : Tensor [N] or None
        x's dtype.
    gelu : bool
        Apply tanh-GELU (GPT-2's) after the bias.
    out_dtype : torch.dtype or None
        Output dtype (None: x's), e.g. fp32 logits straight from the accumulator.
    out : Tensor [R, N] or None
        Where to write (dtype `out_dtype`, on x's device, last dimension contiguous, any row
        stride: e.g. a view of a buffer whose rows are padded for aligned loads); None allocates.

    Returns
    -------
    Tensor [R, N]: `out`, or a new contiguous tensor.

    Examples
    --------
    >>> qkv = layernorm_linear(x, ln_1.weight, ln_1.bias, 1e-5, c_attn.weight, c_attn.bias)
    >>> h = layernorm_linear(x, ln_2.weight, ln_2.bias, 1e-5, c_fc.weight, c_fc.bias, gelu=True)
    >>> logits = layernorm_linear(x, ln_f.weight, ln_f.bias, 1e-5, wte.weight, None, out_dtype=torch.float32)
    """
    name = "layernorm_linear"
    check_rows(name, "x", x)
    R, K = x.shape
    if K < 1:
        raise ValueError(f"{name}: x needs K >= 1 columns (the LayerNorm is over them), got shape {tuple(x.shape)}")
    for arg, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_vector(name, arg, t, K, x.dtype)
    eps = check_eps(name, eps)
    N = _check_linear(name, K, x.dtype, weight, bias)
    out_dtype = _check_out_dtype(name, out_dtype, x.dtype)
    device = check_launch_device(name, x, ln_weight, ln_bias, weight, bias)
    out = _check_out(name, out, R, N, out_dtype, device)
    if R == 0 or N == 0:
        return out
    launch(out, x, x, x, x, x, ln_weight, ln_bias, weight, bias, eps, False, bool(gelu), R, K)
    return out


def embed_layernorm_linear(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding, LayerNorm and linear in one kernel: `s = wte[tokens] + wpe[positions]`,
    `out = LayerNorm(s) @ weight.T + bias` (Triton). GPT-2's first block's QKV projection with the
    embedding folded in.

    Parameters
    ----------
    tokens, positions : Tensor [R], int64
        Ids (validated by the caller: out-of-range ids read the nearest row).
    wte : Tensor [V, K], wpe : Tensor [P, K]
        fp32/fp16/bf16, one dtype, last dimension contiguous, any row stride.
    ln_weight, ln_bias, eps, weight, bias :
        As for `layernorm_linear` (the dtype is wte's).

    Returns
    -------
    out : Tensor [R, N], wte's dtype.
    s : Tensor [R, K], wte's dtype: the residual stream (the embedding sum, rounded).

    Examples
    --------
    >>> qkv, x = embed_layernorm_linear(tokens, positions, wte.weight, wpe.weight, ln_1.weight,
    ...                                 ln_1.bias, 1e-5, c_attn.weight, c_attn.bias)
    """
    name = "embed_layernorm_linear"
    check_rows(name, "wte", wte)
    check_rows(name, "wpe", wpe, wte.shape[1], wte.dtype)
    K = wte.shape[1]
    if K < 1 or wte.shape[0] < 1 or wpe.shape[0] < 1:
        raise ValueError(f"{name}: wte {tuple(wte.shape)} and wpe {tuple(wpe.shape)} must be non-empty")
    for arg, t in (("tokens", tokens), ("positions", positions)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            shown = f"{t.dtype} shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a 1-D int64 tensor, got {shown}")
    if positions.shape != tokens.shape:
        raise ValueError(f"{name}: positions {tuple(positions.shape)} must match tokens {tuple(tokens.shape)}")
    if tokens.stride(0) != 1 and tokens.shape[0] > 1 or positions.stride(0) != 1 and positions.shape[0] > 1:
        raise ValueError(f"{name}: tokens and positions must be contiguous, got strides "
                         f"{tokens.stride()} and {positions.stride()}")
    for arg, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_vector(name, arg, t, K, wte.dtype)
    eps = check_eps(name, eps)
    N = _check_linear(name, K, wte.dtype, weight, bias)
    device = check_launch_device(name, tokens, positions, wte, wpe, ln_weight, ln_bias, weight, bias)
    R = tokens.shape[0]
    out = torch.empty((R, N), dtype=wte.dtype, device=device)
    s = torch.empty((R, K), dtype=wte.dtype, device=device)
    if R == 0:
        return out, s
    if N == 0:  # no program would store s
        s.copy_(wte[tokens] + wpe[positions])
        return out, s
    launch(out, s, wte, tokens, positions, wpe, ln_weight, ln_bias, weight, bias, eps, True, False, R, K)
    return out, s


# --------------------------------------------------------------------------------------------
# references (the unfused sequence, eager)
# --------------------------------------------------------------------------------------------


def layernorm_linear_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference of `layernorm_linear` (same signature): `F.layer_norm`, `F.linear`, then
    `F.gelu(approximate="tanh")` when asked, cast to `out_dtype` (copied into `out` if given)."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    y = F.linear(h, weight, bias)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    y = y if out_dtype is None else y.to(out_dtype)
    if out is None:
        return y
    return _check_out("layernorm_linear_ref", out, *y.shape, y.dtype, y.device).copy_(y)


def embed_layernorm_linear_ref(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `embed_layernorm_linear` (same signature): `layernorm.embed_layernorm_ref`,
    then `F.linear`. Returns (out, s)."""
    s, h = embed_layernorm_ref(tokens, positions, wte, wpe, ln_weight, ln_bias, eps)
    return F.linear(h, weight, bias), s

"""Projections into the residual stream: linear + bias + residual add for 1-8 rows in one kernel,
optionally with the split-KV merge of decode attention in its prologue (attention's c_proj).

Math (W: [N, K] nn.Linear layout, residual and out: [R, N])::

    linear_residual:             out = round(residual + x @ W^T + b)
    attn_merge_linear_residual:  y[r, h*D + d] = round(sum_s 2^(m_s - M) acc_s[d] / sum_s 2^(m_s - M) l_s),
                                 M = max_s m_s   (partials of row r, head h; K = H * D)
                                 out = round(residual + y @ W^T + b)

`round` is the cast to the residual's dtype: the sum is formed in fp32 and rounded once (the
unfused sequence rounds the GEMM output, then the sum). y is rounded to that dtype before the
product, as the unfused attention writes it.

In GPT-2's small-batch decode step (the model's `_GemvStages`) these are, per block, the
attention out-projection c_proj + bias + residual with the merge of `decode_attention_partials`
folded in [K3] (no merge kernel), and the MLP's c_proj + bias + residual [K5]. The LayerNorm that
followed them in the unfused step moved into the next GEMV's prologue (`ln_linear`).

Kernel: grid `(cdiv(N, BLOCK_N), cdiv(R, BLOCK_R))` (see `gemv.blocks`); each program walks K in
BLOCK_K tiles, accumulating in fp32, then adds bias and residual and stores. With the merge, each
x tile is computed from the partials of the heads it covers: `[BLOCK_R, BLOCK_K, BLOCK_S]` loads
of acc (contiguous along D) and of (m, l) (the same address for the D lanes of a head: one L1
line), a max and two sums over the splits.

Bytes (e = element size): N K e (the weight, the floor) + N e (bias) + 2 R N e (residual read,
out written) + R K e (x, from L2 after the first program). With the merge, x is replaced by the
fp32 partials, R H S (D + 2) 4 bytes, read by every program from L2 (GPT-2, R=1, S=8: 25 KB per
program, 2.4 MB of L2 reads over 96 programs; DRAM sees them once). GPT-2 124M, bf16, R=1: attn
c_proj 1.2 MB, MLP c_proj 4.7 MB (0.25 and 0.98 us at 4.8 TB/s). FLOPs 2 R N K.

References: Dao et al., "Flash-Decoding for long-context inference" (2023) for the log-sum-exp
merge of split-KV partials; `attn_decode.decode_attention`'s merge kernel, which this replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gemv
from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_launch_device, check_rows, check_vector

# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _merged_tile(
    acc_ptr,  # [R, H, S, HEAD_DIM] fp32 contiguous: the split-KV partial accumulators
    ml_ptr,  # [R, H, S, 2] fp32 contiguous: the partials' (m, l)
    rows,
    mask_r,
    k,
    mask_k,
    H,
    S,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """The attention output y[rows, k] (k = h * HEAD_DIM + d) merged from the split-KV partials
    part_acc [R, H, S, HEAD_DIM], part_ml [R, H, S, 2] (fp32, contiguous), rounded to OUT_DTYPE."""
    head = k // HEAD_DIM
    d = k % HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    # [BLOCK_R, BLOCK_K, BLOCK_S]: partial row (r, head, s)
    prow = (rows[:, None, None] * H + head[None, :, None]) * S + offs_s[None, None, :]
    pm = mask_r[:, None, None] & mask_k[None, :, None] & (offs_s < S)[None, None, :]
    m = tl.load(ml_ptr + prow * 2, mask=pm, other=float("-inf"))
    l = tl.load(ml_ptr + prow * 2 + 1, mask=pm, other=0.0)
    a = tl.load(acc_ptr + prow * HEAD_DIM + d[None, :, None], mask=pm, other=0.0)
    m_max = tl.max(m, 2)
    # empty splits (and rows without keys) carry m = -inf: weight 0, never -inf - -inf
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    wgt = tl.exp2(m - m_ref[:, :, None])
    y = tl.sum(wgt * a, 2) / tl.maximum(tl.sum(wgt * l, 2), 1e-30)  # a row without keys: zeros
    return y.to(OUT_DTYPE).to(tl.float32)


@triton.jit(do_not_specialize=["R", "S"])
def _linear_residual_kernel(
    out_ptr,  # [R, N] x's dtype, row stride stride_out; written
    x_ptr,  # [R, K] fp16/bf16/fp32, row stride stride_x, unit column stride; read unless MERGE
    acc_ptr,  # [R, H, S, HEAD_DIM] fp32 contiguous (K = H * HEAD_DIM); read when MERGE
    ml_ptr,  # [R, H, S, 2] fp32 contiguous, (m, l) per split; read when MERGE
    w_ptr,  # [N, K] out's dtype (nn.Linear layout), row stride stride_w, unit column stride
    b_ptr,  # [N] out's dtype, contiguous; read when HAS_BIAS
    res_ptr,  # [R, N] out's dtype, row stride stride_res, unit column stride
    stride_out,
    stride_x,
    stride_w,
    stride_res,
    R,
    N,
    K,
    H,
    S,
    MERGE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    rows = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w  # W: [N, K], rows contiguous along K
    x_rows = x_ptr + rows[:, None] * stride_x  # x: [R, K], any row stride
    # NOTE: products are summed over K once, after the loop: the loop body is loads and FMAs
    # only (no cross-lane shuffles per tile), so consecutive tiles' loads can be in flight together
    acc3 = tl.zeros([BLOCK_R, BLOCK_N, BLOCK_K], dtype=tl.float32)
    # unrolled: ptxas then issues two tiles' weight loads before their FMAs (the loop is not
    # software-pipelined through shared memory; sm_90 SASS checked); not with the merge prologue,
    # whose [BLOCK_R, BLOCK_K, BLOCK_S] tiles would double the registers
    for k0 in tl.range(0, K, BLOCK_K, loop_unroll_factor=UNROLL):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if MERGE:
            x = _merged_tile(acc_ptr, ml_ptr, rows, mask_r, k, mask_k, H, S, HEAD_DIM, BLOCK_S,
                             out_ptr.dtype.element_ty)
        else:
            x = tl.load(x_rows + k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc3 += x[:, None, :] * w.to(tl.float32)[None, :, :]  # fp32 FMAs, no tensor cores
    acc = tl.sum(acc3, 2)  # [BLOCK_R, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_r[:, None] & mask_n[None, :]
    acc += tl.load(res_ptr + rows[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _check_weight_bias_residual(name: str, K: int, R: int, dtype, weight, bias, residual) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        shown = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be 2-D [N, K={K}] (nn.Linear layout), got {shown}")
    if weight.dtype != dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} differs from the input's dtype {dtype}")
    if K > 1 and weight.stride(1) != 1:
        raise ValueError(f"{name}: weight rows must be contiguous (stride 1 along K), got strides {weight.stride()}")
    N = weight.shape[0]
    check_vector(name, "bias", bias, N, dtype)
    check_rows(name, "residual", residual, N, dtype)
    if residual.shape[0] != R:
        raise ValueError(f"{name}: residual must be [R={R}, N={N}], got shape {tuple(residual.shape)}")
    return N


def _launch(out, x, part_acc, part_ml, weight, bias, residual, R, K, H, S, head_dim, merge):
    N = weight.shape[0]
    block_r, block_n, block_k = gemv.blocks(R, N, K, out.device)
    block_s = triton.next_power_of_2(S)
    if merge:
        # the merge tile is [BLOCK_R, BLOCK_K, BLOCK_S] x 3 loads: at most 4096 elements each
        # (sm_90, bf16, S=8: 80 registers at R=1, no spills)
        block_k = min(block_k, max(16, 4096 // (block_r * block_s)))
    _linear_residual_kernel[(triton.cdiv(N, block_n), triton.cdiv(R, block_r))](
        out, x, part_acc, part_ml, weight,
        weight if bias is None else bias,  # unused pointer when absent
        residual,
        out.stride(0), x.stride(0), weight.stride(0), residual.stride(0),
        R, N, K, H, S,
        MERGE=merge,
        HAS_BIAS=bias is not None,
        HEAD_DIM=head_dim,
        BLOCK_S=block_s,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        UNROLL=1 if merge else 2,
        num_warps=4,
    )  # fmt: skip


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
) -> torch.Tensor:
    """`residual + x @ weight.T + bias` in one kernel, for a few rows (Triton).

    Parameters
    ----------
    x : Tensor [R, K]
        fp32/fp16/bf16, last dimension contiguous, any row stride.
    weight : Tensor [N, K]
        nn.Linear layout, x's dtype, rows contiguous.
    bias : Tensor [N] or None
    residual : Tensor [R, N]
        x's dtype, last dimension contiguous.

    Returns
    -------
    Tensor [R, N], x's dtype, contiguous (a new tensor).

    Examples
    --------
    >>> x = linear_residual(h, mlp.c_proj.weight, mlp.c_proj.bias, x)
    """
    name = "linear_residual"
    check_rows(name, "x", x)
    R, K = x.shape
    _check_weight_bias_residual(name, K, R, x.dtype, weight, bias, residual)
    device = check_launch_device(name, x, weight, bias, residual)
    out = torch.empty(residual.shape, dtype=x.dtype, device=device)
    if out.numel() == 0:
        return out
    if K == 0:
        out.copy_(residual if bias is None else residual + bias)
        return out
    _launch(out, x, x, x, weight, bias, residual, R, K, 1, 1, 1, False)
    return out


def _check_partials(name: str, part_acc, part_ml) -> tuple[int, int, int, int]:
    if not isinstance(part_acc, torch.Tensor) or part_acc.dim() != 4 or part_acc.dtype != torch.float32:
        is_tensor = isinstance(part_acc, torch.Tensor)
        shown = f"{part_acc.dtype} shape {tuple(part_acc.shape)}" if is_tensor else type(part_acc).__name__
        raise ValueError(f"{name}: part_acc must be fp32 [R, H, S, D], got {shown}")
    R, H, S, D = part_acc.shape
    if not isinstance(part_ml, torch.Tensor) or tuple(part_ml.shape) != (R, H, S, 2) or part_ml.dtype != torch.float32:
        is_tensor = isinstance(part_ml, torch.Tensor)
        shown = f"{part_ml.dtype} shape {tuple(part_ml.shape)}" if is_tensor else type(part_ml).__name__
        raise ValueError(f"{name}: part_ml must be fp32 [R={R}, H={H}, S={S}, 2], got {shown}")
    if not (part_acc.is_contiguous() and part_ml.is_contiguous()):
        raise ValueError(f"{name}: part_acc and part_ml must be contiguous, got strides "
                         f"{part_acc.stride()} and {part_ml.stride()}")
    if S < 1 or D < 1 or H < 1:
        raise ValueError(f"{name}: partials need H, S, D >= 1, got shape {tuple(part_acc.shape)}")
    return R, H, S, D


def attn_merge_linear_residual(
    part_acc: torch.Tensor,
    part_ml: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
) -> torch.Tensor:
    """Merge split-KV decode-attention partials and apply the output projection, its bias and
    the residual add, in one kernel (Triton): `residual + merge(partials) @ weight.T + bias`.

    Parameters
    ----------
    part_acc : Tensor [R, H, S, D], fp32
        Unnormalised per-split outputs (from `attn_decode.decode_attention_partials`), contiguous.
    part_ml : Tensor [R, H, S, 2], fp32
        Per split the running max m (log2 units) and the sum l, contiguous.
    weight : Tensor [N, H * D]
        nn.Linear layout, residual's dtype, rows contiguous (K = H * D in head-major order, the
        layout of the attention output `[R, H, D]` flattened).
    bias : Tensor [N] or None
    residual : Tensor [R, N]
        fp32/fp16/bf16: the output dtype; the merged attention output is rounded to it.

    Returns
    -------
    Tensor [R, N], residual's dtype, contiguous (a new tensor).

    Examples
    --------
    >>> part_acc, part_ml = decode_attention_partials(q, k_cache, v_cache, ...)
    >>> x = attn_merge_linear_residual(part_acc, part_ml, attn.c_proj.weight, attn.c_proj.bias, x)
    """
    name = "attn_merge_linear_residual"
    R, H, S, D = _check_partials(name, part_acc, part_ml)
    check_rows(name, "residual", residual)
    dtype = residual.dtype
    _check_weight_bias_residual(name, H * D, R, dtype, weight, bias, residual)
    device = check_launch_device(name, part_acc, part_ml, weight, bias, residual)
    out = torch.empty(residual.shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    _launch(out, part_acc, part_acc, part_ml, weight, bias, residual, R, H * D, H, S, D, True)
    return out


# --------------------------------------------------------------------------------------------
# references (the unfused sequence, eager)
# --------------------------------------------------------------------------------------------


def linear_residual_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor) -> torch.Tensor:
    """Eager reference of `linear_residual` (same signature): `residual + F.linear(x, weight, bias)`."""
    return residual + F.linear(x, weight, bias)


def merge_partials_ref(part_acc: torch.Tensor, part_ml: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp merge of split-KV partials (the merge kernel of `decode_attention`), eager,
    fp32: [R, H, S, D] and [R, H, S, 2] -> [R, H, D]; a head without keys gives zeros."""
    m, l = part_ml[..., 0], part_ml[..., 1]  # [R, H, S]
    m_max = m.amax(dim=-1, keepdim=True)
    m_ref = torch.where(m_max == float("-inf"), torch.zeros_like(m_max), m_max)
    w = torch.exp2(m - m_ref)  # [R, H, S]
    out = (w[..., None] * part_acc).sum(dim=2)  # [R, H, D]
    return out / (w * l).sum(dim=2).clamp_min(1e-30)[..., None]


def attn_merge_linear_residual_ref(part_acc: torch.Tensor, part_ml: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """Eager reference of `attn_merge_linear_residual` (same signature): `merge_partials_ref`,
    rounded to residual's dtype (as the attention output), then `linear_residual_ref`."""
    R = part_acc.shape[0]
    y = merge_partials_ref(part_acc, part_ml).to(residual.dtype).reshape(R, -1)  # [R, H * D]
    return linear_residual_ref(y, weight, bias, residual)

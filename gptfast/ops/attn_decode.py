"""`decode_attention`: attention of one new token per sequence over its paged K/V (split-KV),
with its specialisations (the K/V append, the QKV bias) and `decode_attention_partials`, the
split pass alone for a consumer that merges the partials itself.

What it computes: per row b and head h, `softmax(scale * q k^T) v` over the keys
`[0, seq_lens[b])` read through the block table (layout and math in `paged`).

Why split-KV (flash-decoding): one query row per (sequence, head) is too few programs to fill a
GPU at small batches, so the keys of a sequence are cut into `num_splits` ranges of whole
`BLOCK_N` tiles. Grid `(B, H, num_splits)`: each program runs the online softmax over its range
(one K and one V `[BLOCK_N, D]` tile per step, both requested before any math) and writes an
unnormalised partial `(acc, m, l)` in fp32; a second kernel with grid `(B, H)` merges the
partials with their log-sum-exp weights. When `B * H` alone fills the GPU, `num_splits` is 1
and the first kernel writes the output directly (one launch). `num_splits` depends only on
static shapes (B, H, max context `block_tables.shape[1] * block_size`, the SM count) and each
program reads `seq_lens` on the device, so the launch is CUDA-graph capturable (no host sync, no
data-dependent grid or allocation). `num_splits` is a run-time argument (only "split or not" is
compiled in), so the graphs of all batch-size buckets share two compiled variants. Bytes:
2 * H * D * e * sum_b seq_len_b (K and V read once) plus the fp32 partials,
8 * B * H * num_splits * (D + 2) bytes; FLOPs 4 * H * D * sum_b seq_len_b: ~1 FLOP/byte,
bandwidth-bound. B=8, context 1024, H=12, D=64: 25 MB, 8.4 us at 3 TB/s; batch 1 is
launch-latency-bound (3 MB, 1 us).

The append (`k_new, v_new, slot_mapping`, the `APPEND` specialisation): the kernel also does the
decode step's `kv_cache_write`. The new token is key seq_len - 1; the one program whose range
holds it takes its K/V from `k_new`/`v_new` (requested before its cache loop, so the latency
hides) instead of the cache, adds it as one more online-softmax step after the loop, and stores
it to its slot. No program reads that slot, so the store needs no ordering inside the grid. This
saves the separate write's launch (a launch gap costs about as much as the DRAM time of a
per-layer kernel) and the re-read of the new key; bytes: K/V of the seq_len - 1 cached keys
read, k_new/v_new read and written once.

The QKV bias (`qkv_bias`, the `HAS_QKV_BIAS` specialisation, only with the append): the kernel
also adds the QKV projection's bias `[3, H, D]`: every program adds q's row to q (fp32, before
the scale), the owner of the new key adds K's and V's rows and rounds them to the cache dtype, so
it attends to exactly the values it stores and later steps read back. The projection then runs
bias-free: at batch 1 `F.linear` with a bias is two kernels (bias copy, then GEMM with beta = 1),
12 launches per GPT-2 124M step that this removes. Bytes: + 3 * H * D * e per batch row (q's row
by each split program, K's and V's by the owner), the same 3 * H * D elements for every row, so
from DRAM once (3 * H * D * e, 4.6 KB for GPT-2 in bf16) and L2 after.

The partials (`decode_attention_partials`): the split kernel alone, always writing partials; the
small-batch decode step merges them in the prologue of the output projection
(`proj_residual.attn_merge_linear_residual`), so it has no merge kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_block_tables, check_int_vector, check_launch_device, check_paged_cache, check_scale
from .common import sm_count
from .kv_write import kv_cache_write_ref
from .paged import LOG2E, gather_pages, masked_attention

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "max_blocks"])
def _decode_split_kernel(
    out_ptr,  # [B, H, D] q's dtype, strides (stride_ob, stride_oh, 1); written when not SPLIT
    part_acc_ptr,  # [B, H, num_splits, D] fp32 contiguous; written when SPLIT
    part_ml_ptr,  # [B, H, num_splits, 2] fp32 contiguous, (m, l); written when SPLIT
    q_ptr,  # [B, H, D] fp16/bf16/fp32, strides (stride_qb, stride_qh, 1)
    k_cache_ptr,  # [num_blocks, block_size, H, D] contiguous, q's dtype; written when APPEND
    v_cache_ptr,  # [num_blocks, block_size, H, D] contiguous, q's dtype; written when APPEND
    k_new_ptr,  # [B, H, D] q's dtype, strides (stride_knb, stride_knh, 1); read when APPEND
    v_new_ptr,  # [B, H, D] q's dtype, strides (stride_vnb, stride_vnh, 1); read when APPEND
    slot_ptr,  # [B] int64, the new token's slot (negative: not cached); read when APPEND
    qkv_bias_ptr,  # [3, H, D] q's dtype, contiguous; read when HAS_QKV_BIAS
    bt_ptr,  # [B, max_blocks] int32, row stride stride_bt, unit column stride
    seq_lens_ptr,  # [B] int32, keys per row, the current token included
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_k_slot,
    stride_kh,
    stride_v_slot,
    stride_vh,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_bt,
    max_blocks,
    H,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr,
    APPEND: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    # NOTE: clamped to the block table's capacity (no out-of-bounds gather) and to >= 0
    # (padding rows of a CUDA-graph bucket have seq_len 0 and produce zeros).
    seq_len = tl.maximum(tl.minimum(tl.load(seq_lens_ptr + b), max_blocks * BLOCK_SIZE), 0)
    # this split's keys: whole BLOCK_N tiles, so only the last range has a ragged tail
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, seq_len)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=mask_d, other=0.0)
    q = q.to(tl.float32)
    if HAS_QKV_BIAS:
        # qkv_bias: [3, H, D] contiguous, row (i, h) at (i * H + h) * HEAD_DIM for i = q, k, v.
        # q's bias is added in fp32 and q is never rounded (it is not stored).
        q += tl.load(qkv_bias_ptr + h * HEAD_DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    q = q * qk_scale  # [BLOCK_D], scores come out in log2 units
    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + h * stride_kh
    v_base = v_cache_ptr + h * stride_vh

    if APPEND:
        # The new token is key seq_len - 1. Its K/V come from registers (k_new, v_new), never
        # from its cache slot, and only the program whose range holds that key stores them: no
        # program reads the slot another one writes (there is no ordering inside the grid).
        # A seq_len 0 row has no owner: it writes nothing.
        last = seq_len - 1
        owns_new = (last >= lo) & (last < hi)
        # requested here so that their latency hides behind the cache loop
        # COMPAT(triton 3.6): tl.where, not `mask_d & owns_new`: the interpreter fails on a tensor &
        # a scalar bool (checked with triton 3.6.0)
        new_mask = tl.where(owns_new, mask_d, False)
        k_new = tl.load(k_new_ptr + b.to(tl.int64) * stride_knb + h * stride_knh + offs_d, mask=new_mask, other=0.0)
        v_new = tl.load(v_new_ptr + b.to(tl.int64) * stride_vnb + h * stride_vnh + offs_d, mask=new_mask, other=0.0)
        new_slot = tl.load(slot_ptr + b)  # int64; negative: attend to the token but do not cache it
        if HAS_QKV_BIAS:  # only the owner's loads are unmasked: one bias read per row
            k_bias = tl.load(qkv_bias_ptr + (H + h) * HEAD_DIM + offs_d, mask=new_mask, other=0.0)
            v_bias = tl.load(qkv_bias_ptr + (2 * H + h) * HEAD_DIM + offs_d, mask=new_mask, other=0.0)
        hi = tl.minimum(hi, last)  # the cache loop stops before the new key

    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_n = lo + tl.arange(0, BLOCK_N)
    blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=offs_n < hi, other=0)
    for _ in range(lo, hi, BLOCK_N):
        mask_n = offs_n < hi
        # slot of key j: k_cache viewed as [num_blocks * block_size, H, D]
        slot = blk.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # K, V and the next tile's page ids are all requested before any math: one memory
        # latency per step instead of two (page id -> K/V) and more bytes in flight per program
        k = tl.load(k_base + slot[:, None] * stride_k_slot + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_v_slot + offs_d[None, :], mask=kv_mask, other=0.0)
        offs_next = offs_n + BLOCK_N
        blk = tl.load(bt_row_ptr + offs_next // BLOCK_SIZE, mask=offs_next < hi, other=0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # [BLOCK_N]
        s = tl.where(mask_n, s, float("-inf"))
        # NOTE: each step starts below hi, so the tile holds at least one valid key and m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
        offs_n = offs_next

    if APPEND:  # compile-time; the run-time test below stays a separate branch
        if owns_new:
            if HAS_QKV_BIAS:
                # added after the loop so that waiting for these loads does not delay it; rounded
                # to the cache dtype, so this step attends to exactly what later steps will read
                # back from the slot (and what F.linear with the bias would give, up to rounding)
                k_new = (k_new.to(tl.float32) + k_bias.to(tl.float32)).to(k_cache_ptr.dtype.element_ty)
                v_new = (v_new.to(tl.float32) + v_bias.to(tl.float32)).to(v_cache_ptr.dtype.element_ty)
            # one more online-softmax step with a single key; m_i may still be -inf here (the new
            # token alone in its range), then alpha = 0 and acc, l_i are 0: still no NaN
            s_new = tl.sum(k_new.to(tl.float32) * q, 0)
            m_with_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_with_new)
            p_new = tl.exp2(s_new - m_with_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha + p_new * v_new.to(tl.float32)
            m_i = m_with_new
            # k_cache: [num_blocks * block_size, H, D] row `new_slot`, head h
            store_mask = tl.where(new_slot >= 0, mask_d, False)
            tl.store(k_base + new_slot * stride_k_slot + offs_d, k_new, mask=store_mask)
            tl.store(v_base + new_slot * stride_v_slot + offs_d, v_new, mask=store_mask)

    if not SPLIT:
        out = acc / tl.maximum(l_i, 1e-30)  # an empty row has acc = 0, l = 0: zeros
        out_row = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
        tl.store(out_row + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)
    else:
        # partials: part_acc [B, H, num_splits, D], part_ml [B, H, num_splits, 2] (fp32, contiguous)
        row = (b.to(tl.int64) * H + h) * num_splits + split
        tl.store(part_acc_ptr + row * HEAD_DIM + offs_d, acc, mask=mask_d)
        tl.store(part_ml_ptr + row * 2, m_i)
        tl.store(part_ml_ptr + row * 2 + 1, l_i)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    out_ptr,  # [B, H, D] fp16/bf16/fp32, strides (stride_ob, stride_oh, 1); written
    part_acc_ptr,  # [B, H, num_splits, D] fp32 contiguous
    part_ml_ptr,  # [B, H, num_splits, 2] fp32 contiguous, (m, l) per split
    stride_ob,
    stride_oh,
    H,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    rows = (b.to(tl.int64) * H + h) * num_splits + offs_s  # [BLOCK_S]
    m = tl.load(part_ml_ptr + rows * 2, mask=mask_s, other=float("-inf"))
    l = tl.load(part_ml_ptr + rows * 2 + 1, mask=mask_s, other=0.0)
    acc = tl.load(
        part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0
    )
    m_max = tl.max(m, 0)
    # empty splits (and seq_len 0 rows) carry m = -inf: weight 0, never -inf - -inf
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_ref)  # [BLOCK_S]
    l_tot = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * acc, 0)  # [BLOCK_D]
    out = o / tl.maximum(l_tot, 1e-30)  # l_tot >= 1 unless the row has no key (then o = 0)
    out_row = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(out_row + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


# Decode: programs per SM that the split-KV grid aims for. A decode program holds one
# [BLOCK_N, D] K and V tile, so several fit on an SM at once; ~4 per SM keeps enough loads in
# flight to approach HBM bandwidth while the merge stays small.
_DECODE_PROGRAMS_PER_SM = 4
_DECODE_MAX_SPLITS = 64
# SM count assumed off-GPU (interpreter): small, so CPU tests exercise several splits.
_INTERPRETER_SM_COUNT = 4


def _sm_count(device: torch.device) -> int:
    return sm_count(device, _INTERPRETER_SM_COUNT)


def _decode_block_n(block_d: int) -> int:
    return 64 if block_d <= 64 else 32


def _decode_num_splits(batch: int, heads: int, max_context: int, block_n: int, sm_count: int) -> int:
    """Split-KV factor from static shapes only (CUDA-graph safe).

    Enough (batch, head, split) programs to give every SM `_DECODE_PROGRAMS_PER_SM` of them, never
    more splits than `BLOCK_N` tiles in the longest possible context, at most `_DECODE_MAX_SPLITS`.
    E.g. H100 (132 SMs), H=12: B=1 -> 44 splits, B=8 -> 6, B>=44 -> 1 (single launch).
    """
    programs = batch * heads
    target = _DECODE_PROGRAMS_PER_SM * sm_count
    if programs >= target:
        return 1
    splits = triton.cdiv(target, programs)
    return max(1, min(splits, triton.cdiv(max_context, block_n), _DECODE_MAX_SPLITS))


def _append_requested(
    name: str,
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> bool:
    """Checks the append arguments; returns whether the call appends the new token's K/V (all three
    given) or not (none given)."""
    given = {"k_new": k_new, "v_new": v_new, "slot_mapping": slot_mapping}
    if all(t is None for t in given.values()):
        return False
    if any(t is None for t in given.values()):
        seen = ", ".join(f"{k}={'None' if t is None else 'Tensor'}" for k, t in given.items())
        raise ValueError(f"{name}: k_new, v_new and slot_mapping go together (all three or none), got {seen}")
    for arg, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != q.shape or t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError(
                f"{name}: {arg} must match q's shape {tuple(q.shape)} and dtype {q.dtype} with a contiguous "
                f"last dimension, got {tuple(t.shape)} {t.dtype} strides {t.stride()}"
            )
    check_int_vector(name, "slot_mapping", slot_mapping, q.shape[0], torch.int64)
    return True


def _qkv_bias_requested(name: str, q: torch.Tensor, qkv_bias: torch.Tensor | None, append: bool) -> bool:
    """Checks `qkv_bias`; returns whether the call adds the QKV projection's bias (given, with the
    append) or not (None)."""
    if qkv_bias is None:
        return False
    if not append:
        raise ValueError(
            f"{name}: qkv_bias needs the append arguments (k_new, v_new, slot_mapping): the bias of "
            f"the new token's K/V is added where they are stored"
        )
    if not isinstance(qkv_bias, torch.Tensor):
        raise ValueError(f"{name}: qkv_bias must be a tensor [3, H, D] or None, got {type(qkv_bias).__name__}")
    H, D = q.shape[1], q.shape[2]
    if tuple(qkv_bias.shape) != (3, H, D):
        raise ValueError(f"{name}: qkv_bias must be [3, H={H}, D={D}], got shape {tuple(qkv_bias.shape)}")
    if qkv_bias.dtype != q.dtype:
        raise ValueError(f"{name}: qkv_bias dtype {qkv_bias.dtype} differs from q dtype {q.dtype}")
    if qkv_bias.device != q.device:
        raise ValueError(f"{name}: qkv_bias is on {qkv_bias.device}, q on {q.device}; they must share a device")
    if not qkv_bias.is_contiguous():
        raise ValueError(f"{name}: qkv_bias must be contiguous, got strides {qkv_bias.stride()}")
    return True


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V, split-KV (Triton);
    optionally appending that token's K/V to the cache in the same launch.

    CUDA-graph capturable: the grid and workspace depend only on shapes, `seq_lens` (and
    `slot_mapping`) are read on the device. Rows with `seq_lens[b] == 0` (graph padding) output
    zeros (and write nothing).

    With `k_new, v_new, slot_mapping` the call is `kv_cache_write(k_new, v_new, k_cache, v_cache,
    slot_mapping)` followed by the attention, in one pass: the new token is the last key of row
    b, at position `seq_lens[b] - 1`, and its K/V are taken from `k_new`/`v_new` (never read
    back from the cache) and stored at `slot_mapping[b]`.

    With `qkv_bias` as well, the call also adds the QKV projection's bias, as if `q += bias[0]`,
    `k_new += bias[1]`, `v_new += bias[2]` had run first: in fp32, then K/V rounded to the cache
    dtype (stored and attended to alike; q is used unrounded). So the projection can run as a
    bias-free GEMM: at batch 1, `F.linear` with a bias cannot use cuBLASLt's bias epilogue and
    launches a second kernel (a copy of the bias into the output) per layer.

    Parameters
    ----------
    q : Tensor [B, H, D]
        fp16/bf16/fp32, last dimension contiguous (batch and head strides are free: a view of a
        fused QKV projection needs no copy).
    k_cache, v_cache : Tensor [num_blocks, block_size, H, D]
        Contiguous, q's dtype. Without the append the current token's K/V must already be in
        them; with it they are written in place.
    block_tables : Tensor [B, max_blocks], int32
        Page ids per sequence (rows contiguous).
    seq_lens : Tensor [B], int32
        Keys per sequence, current token included; `0 <= seq_lens[b] <= max_blocks * block_size`
        (larger values are clamped to the table's capacity).
    scale : float
        Score scale, e.g. `1 / sqrt(D)`.
    k_new, v_new : Tensor [B, H, D], optional
        The current token's K/V, q's dtype, last dimension contiguous, any batch/head strides.
    slot_mapping : Tensor [B], int64, optional
        Cache slot of the current token (`block_id * block_size + offset` of position
        `seq_lens[b] - 1`); negative: attend to the token without caching it. Rows with
        `seq_lens[b] == 0` store nothing, whatever their slot. NOTE: no other row of the batch
        may read a row's slot (the block manager never shares a sequence's last block).
    qkv_bias : Tensor [3, H, D], optional
        Biases of q, k_new and v_new (e.g. `c_attn.bias.view(3, H, D)`): contiguous, q's dtype
        and device. Only with the append arguments.

    Returns
    -------
    Tensor [B, H, D], q's dtype.

    Examples
    --------
    >>> out = decode_attention(q, k_cache, v_cache, block_tables, seq_lens, D ** -0.5)
    >>> q, k, v = qkv.unbind(1)  # qkv: [B, 3, H, D]
    >>> out = decode_attention(q, k_cache, v_cache, block_tables, seq_lens, D ** -0.5,
    ...                        k_new=k, v_new=v, slot_mapping=slots)
    >>> qkv = F.linear(x, c_attn.weight).view(B, 3, H, D)  # bias-free projection
    >>> q, k, v = qkv.unbind(1)
    >>> out = decode_attention(q, k_cache, v_cache, block_tables, seq_lens, D ** -0.5, k_new=k,
    ...                        v_new=v, slot_mapping=slots, qkv_bias=c_attn.bias.view(3, H, D))
    """
    name = "decode_attention"
    check_paged_cache(name, q, k_cache, v_cache)
    B, H, D = q.shape
    check_int_vector(name, "seq_lens", seq_lens, B, torch.int32)
    check_block_tables(name, block_tables, B)
    qk_scale = check_scale(name, scale) * LOG2E
    append = _append_requested(name, q, k_new, v_new, slot_mapping)
    has_bias = _qkv_bias_requested(name, q, qkv_bias, append)
    check_launch_device(name, q, k_cache, v_cache, block_tables, seq_lens,
                         *((k_new, v_new, slot_mapping) if append else ()), *((qkv_bias,) if has_bias else ()))
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    block_size = k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    block_d = triton.next_power_of_2(D)
    block_n = _decode_block_n(block_d)
    num_splits = _decode_num_splits(B, H, max_blocks * block_size, block_n, _sm_count(q.device))
    if num_splits > 1:
        part_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((B, H, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused: the split kernel writes `out` directly
    # unused by the kernel: placeholders of fixed types, so one compiled variant per flag
    if not append:
        k_new, v_new, slot_mapping = q, q, seq_lens
    if not has_bias:
        qkv_bias = q
    _decode_split_kernel[(B, H, num_splits)](
        out, part_acc, part_ml, q, k_cache, v_cache, k_new, v_new, slot_mapping, qkv_bias, block_tables,
        seq_lens,
        qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        block_tables.stride(0), max_blocks, H, num_splits,
        HEAD_DIM=D,
        SPLIT=num_splits > 1,
        APPEND=append,
        HAS_QKV_BIAS=has_bias,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
        num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _decode_merge_kernel[(B, H)](
            out, part_acc, part_ml, out.stride(0), out.stride(1), H, num_splits,
            HEAD_DIM=D,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=max(1, min(4, triton.next_power_of_2(num_splits) * block_d // 1024)),
        )  # fmt: skip
    return out


# (`proj_residual.attn_merge_linear_residual`), where every program reads all the partials (from
# L2), so fewer splits than the two-kernel path: at batch 1, 12 heads x 8 = 96 programs.
PARTIALS_MAX_SPLITS = 8


def partials_num_splits(batch: int, heads: int, max_context: int, head_dim: int, device: torch.device) -> int:
    """The default split count of `decode_attention_partials` (static shapes only: CUDA-graph
    safe): `decode_attention`'s choice, at most 8."""
    block_n = _decode_block_n(triton.next_power_of_2(head_dim))
    return min(PARTIALS_MAX_SPLITS, _decode_num_splits(batch, heads, max_context, block_n, _sm_count(device)))


def decode_attention_partials(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    qkv_bias: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_attention`'s split-KV pass alone (Triton, one launch): the unnormalised partials,
    for a consumer that merges them itself (`attn_merge_linear_residual` folds the merge into the
    output projection, so a small-batch decode step has no merge kernel).

    Split s of row b covers the keys `[s * T, min((s + 1) * T, seq_len))`, T = `BLOCK_N *
    ceil(ceil(seq_len / BLOCK_N) / num_splits)` (`BLOCK_N` = 64 for head_dim <= 64, else 32);
    `m` is the max of its scores `scale * log2(e) * <q, k_j>` (base-2 units), `l = sum_j 2^(s_j -
    m)`, `acc = sum_j 2^(s_j - m) v_j`. An empty split has m = -inf, l = 0, acc = 0. The merged
    output is `sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s`, M = max_s m_s.

    Parameters
    ----------
    q, k_cache, v_cache, block_tables, seq_lens, scale, k_new, v_new, slot_mapping, qkv_bias :
        As for `decode_attention` (the append and bias work the same way).
    num_splits : int or None
        Splits per (row, head), >= 1; None: `partials_num_splits` (from shapes only).

    Returns
    -------
    part_acc : Tensor [B, H, num_splits, D], fp32
    part_ml : Tensor [B, H, num_splits, 2], fp32: (m, l) per split.

    Examples
    --------
    >>> part_acc, part_ml = decode_attention_partials(q, k_cache, v_cache, block_tables, seq_lens,
    ...                                               D ** -0.5, k_new=k, v_new=v, slot_mapping=slots)
    """
    name = "decode_attention_partials"
    check_paged_cache(name, q, k_cache, v_cache)
    B, H, D = q.shape
    check_int_vector(name, "seq_lens", seq_lens, B, torch.int32)
    check_block_tables(name, block_tables, B)
    qk_scale = check_scale(name, scale) * LOG2E
    append = _append_requested(name, q, k_new, v_new, slot_mapping)
    has_bias = _qkv_bias_requested(name, q, qkv_bias, append)
    check_launch_device(name, q, k_cache, v_cache, block_tables, seq_lens,
                         *((k_new, v_new, slot_mapping) if append else ()), *((qkv_bias,) if has_bias else ()))
    block_size = k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    num_splits = _check_num_splits(name, num_splits, B, H, max_blocks * block_size, D, q.device)
    part_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((B, H, num_splits, 2), dtype=torch.float32, device=q.device)
    if B == 0:
        return part_acc, part_ml
    block_d = triton.next_power_of_2(D)
    if not append:
        k_new, v_new, slot_mapping = q, q, seq_lens
    if not has_bias:
        qkv_bias = q
    _decode_split_kernel[(B, H, num_splits)](
        part_acc, part_acc, part_ml, q, k_cache, v_cache, k_new, v_new, slot_mapping, qkv_bias, block_tables,
        seq_lens,
        qk_scale,
        q.stride(0), q.stride(1), 0, 0,
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        block_tables.stride(0), max_blocks, H, num_splits,
        HEAD_DIM=D,
        SPLIT=True,
        APPEND=append,
        HAS_QKV_BIAS=has_bias,
        BLOCK_SIZE=block_size,
        BLOCK_N=_decode_block_n(block_d),
        BLOCK_D=block_d,
        num_warps=4,
        num_stages=2,
    )  # fmt: skip
    return part_acc, part_ml


def _check_num_splits(name, num_splits, B, H, max_context, D, device) -> int:
    if num_splits is None:
        return partials_num_splits(B, H, max_context, D, device)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"{name}: num_splits must be None or an int >= 1, got {num_splits!r}")
    return num_splits


# --------------------------------------------------------------------------------------------
# references (eager PyTorch, fp32 math; the CPU path of the runtime)
# --------------------------------------------------------------------------------------------


def _decode_inputs_ref(name, q, k_cache, v_cache, block_tables, seq_lens, k_new, v_new, slot_mapping,
                      qkv_bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `decode_attention_ref` attends with: (q [B, H, D], k, v [B, H, max_blocks * bs, D]),
    the bias added and the new K/V written to the cache and put at their position (see there)."""
    B = q.shape[0]
    append = _append_requested(name, q, k_new, v_new, slot_mapping)
    if _qkv_bias_requested(name, q, qkv_bias, append):
        # as the kernel: q + bias in fp32 (not rounded), K/V + bias rounded to the cache dtype
        # (fp64, the tests' exact dtype, stays fp64)
        bias = qkv_bias.to(torch.promote_types(qkv_bias.dtype, torch.float32))  # [3, H, D]
        q = q.to(bias.dtype) + bias[0]
        k_new = (k_new.to(bias.dtype) + bias[1]).to(k_cache.dtype)
        v_new = (v_new.to(bias.dtype) + bias[2]).to(v_cache.dtype)
    if append:
        # graph-padding rows (seq_len 0) cache nothing, as in the kernel
        slots = torch.where(seq_lens > 0, slot_mapping, torch.full_like(slot_mapping, -1))
        kv_cache_write_ref(k_new, v_new, k_cache, v_cache, slots)
    k = gather_pages(k_cache, block_tables).transpose(1, 2)  # [B, H, max_blocks * bs, D]
    v = gather_pages(v_cache, block_tables).transpose(1, 2)
    if append and k.shape[2] > 0:
        # k, v are fresh gathered copies: put the new token at its position in place, O(B * H * D)
        has_key = (seq_lens > 0)[:, None, None]  # [B, 1, 1]
        rows = torch.arange(B, device=q.device)
        pos = (seq_lens.long().clamp(1, k.shape[2]) - 1)  # [B]; rows without a key keep their values
        k[rows, :, pos] = torch.where(has_key, k_new.to(k.dtype), k[rows, :, pos])  # [B, H, D]
        v[rows, :, pos] = torch.where(has_key, v_new.to(v.dtype), v[rows, :, pos])
    return q, k, v


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference of `decode_attention` (same signature): with the append, first
    `kv_cache_write_ref` of the new K/V (rows with seq_len 0 skipped); then gather all pages of
    the block tables, mask keys at or past `seq_lens`, softmax in fp32, cast to q's dtype.

    With the append, the key at the last position `min(seq_lens[b], capacity) - 1` is `k_new[b]`
    (`v_new[b]`) whatever the cache holds there (the kernel's semantics; they differ from "write,
    then attend" only when `slot_mapping[b]` is not that position's slot, e.g. negative). With
    `qkv_bias`, q, k_new and v_new first get their bias rows added in fp32; K/V are then rounded
    to the cache dtype (q is not). No host sync without the append (on the CPU, see below); the
    write itself syncs on CUDA (adding the bias does not).
    """
    out_dtype = q.dtype
    q, k, v = _decode_inputs_ref("decode_attention_ref", q, k_cache, v_cache, block_tables, seq_lens,
                                 k_new, v_new, slot_mapping, qkv_bias)
    B = q.shape[0]
    if q.device.type == "cpu" and B > 0:
        # On the CPU (the runtime's eager path) the lengths are host values: when every row is
        # full, skip the mask (the fused kernel is faster without one).
        longest = int(seq_lens.max())
        if longest > 0 and bool((seq_lens == longest).all()):
            k, v = k[:, :, :longest], v[:, :, :longest]
            out = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), scale=scale)
            return out[:, :, 0].to(out_dtype)
    visible = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
    out = masked_attention(q[:, :, None], k, v, visible[:, None, None, :], scale)  # [B, H, 1, D]
    return out[:, :, 0].to(out_dtype)


def decode_attention_partials_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    qkv_bias: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `decode_attention_partials` (same signature): the inputs of
    `decode_attention_ref` (append, bias), then each split's (acc, m, l) over its key range, fp32."""
    name = "decode_attention_partials_ref"
    B, H, D = q.shape
    q, k, v = _decode_inputs_ref(name, q, k_cache, v_cache, block_tables, seq_lens, k_new, v_new,
                                 slot_mapping, qkv_bias)
    L = k.shape[2]
    S = _check_num_splits(name, num_splits, B, H, L, D, q.device)
    block_n = _decode_block_n(triton.next_power_of_2(D))
    lens = seq_lens.long().clamp(0, L)  # [B]
    tiles_per_split = ((lens + block_n - 1) // block_n + S - 1) // S  # [B]
    span = (tiles_per_split * block_n).clamp_min(1)  # keys per split
    pos = torch.arange(L, device=q.device)
    split_of = pos[None, :] // span[:, None]  # [B, L]
    in_split = (pos[None, None, :] < lens[:, None, None]) & (
        split_of[:, None, :] == torch.arange(S, device=q.device)[None, :, None])  # [B, S, L]
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * (scale * LOG2E)  # [B, H, L]
    scores = torch.where(in_split[:, None], scores[:, :, None, :], float("-inf"))  # [B, H, S, L]
    m = scores.amax(dim=-1)  # [B, H, S]
    p = torch.exp2(scores - torch.where(m == float("-inf"), 0.0, m)[..., None])  # masked keys: 0
    part_acc = p @ v.float()  # [B, H, S, L] @ [B, H, L, D] -> [B, H, S, D]
    part_ml = torch.stack((m, p.sum(dim=-1)), dim=-1)  # [B, H, S, 2]
    return part_acc, part_ml

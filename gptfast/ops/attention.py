"""Paged attention: the K/V cache write, causal prefill over a ragged batch, split-KV decode.

The K/V cache of one layer is paged (see the contract): `k_cache`, `v_cache` are
`[num_blocks, block_size, H, D]`, contiguous, and the token at position p of sequence b lives at
slot `block_tables[b, p // block_size] * block_size + p % block_size`. Because the cache is
contiguous, a slot s is the row `s` of the cache viewed as `[num_blocks * block_size, H, D]`.

Math (per sequence b, head h; positions count from 0 over the whole sequence, cached prefix
included)::

    S[i, j] = scale * <q_i, k_j>                     for key positions j <= pos(i) < seq_len
    out_i   = sum_j softmax_j(S[i, :]) v_j

Softmax is computed online (flash attention): per query row a running max m, running sum l and
an unnormalised fp32 accumulator, rescaled by exp(m_old - m_new) whenever the max grows. The
kernels work in base 2 (`exp2`) with `scale * log2(e)` folded into q or the scores.

Kernels and their floors (fp16/bf16, e = 2 bytes per element; measured H100 ceilings:
~3.0 TB/s copy bandwidth, ~790 TFLOP/s bf16 matmul):

- `kv_cache_write`: grid `(N,)`, one program per token writes its `[H, D]` K and V rows to their
  slot. Bytes: 4 * N * H * D * e (read k, v; write two cache rows). Pure bandwidth.
- `prefill_attention`: grid `(cdiv(max_seqlen_q, BLOCK_M), H, B)`, the m-blocks in reverse order
  so the longest causal rows start first. Each program keeps a `[BLOCK_M, D]` q tile and walks
  the keys in `BLOCK_N` tiles, each tile gathered through the block table one token row at a
  time (so any block size works, powers of 2 or not). Keys below the tile's first query
  position need no causal mask and run in an unmasked loop; the diagonal tiles run a second,
  masked loop. FLOPs (two matmuls, causal half): 4 * H * D * sum_b q_len_b * (ctx_b + q_len_b / 2),
  i.e. 2 * B * H * T^2 * D for B prompts of T tokens. Bytes: q and out, K/V once:
  (2 * N + 2 * sum_b seq_len_b) * H * D * e. B=4, T=1024, H=12, D=64: 6.4 GFLOP (8.2 us at
  790 TFLOP/s) against 25 MB (8.4 us at 3 TB/s); softmax keeps attention well below matmul
  peak, so in practice the FLOPs set the floor.
- `decode_attention`: flash-decoding. Grid `(B, H, num_splits)`; the valid keys of a sequence,
  `[0, seq_len)`, are cut into `num_splits` ranges of whole `BLOCK_N` tiles; each program runs the
  online softmax over its range (one K and one V `[BLOCK_N, D]` tile per step, both requested
  before any math) and writes an unnormalised partial `(acc, m, l)` in fp32; a second kernel with
  grid `(B, H)` merges the partials with their log-sum-exp weights. When `B * H` alone fills the
  GPU, `num_splits` is 1 and the first kernel writes the output directly (one launch).
  `num_splits` depends only on static shapes (B, H, max context `block_tables.shape[1] *
  block_size`, the SM count) and each program reads `seq_lens` on the device, so the launch is
  CUDA-graph capturable (no host sync, no data-dependent grid or allocation). `num_splits` is a
  run-time argument (only "split or not" is compiled in), so the graphs of all batch-size
  buckets share two compiled variants. Bytes: 2 * H * D * e * sum_b seq_len_b (K and V read
  once) plus the fp32 partials, 8 * B * H * num_splits * (D + 2) bytes; FLOPs
  4 * H * D * sum_b seq_len_b: ~1 FLOP/byte, bandwidth-bound. B=8, context 1024, H=12, D=64:
  25 MB, 8.4 us at 3 TB/s; batch 1 is launch-latency-bound (3 MB, 1 us).
  With the append (`k_new, v_new, slot_mapping`, the `APPEND` specialisation) the kernel also
  does the decode step's `kv_cache_write`: the new token is key seq_len - 1; the one program
  whose range holds it takes its K/V from `k_new`/`v_new` (requested before its cache loop, so
  the latency hides) instead of the cache, adds it as one more online-softmax step after the
  loop, and stores it to its slot. No program reads that slot, so the store needs no ordering
  inside the grid. This saves the separate write's launch (a launch gap costs about as much as
  the DRAM time of a per-layer kernel) and the re-read of the new key; bytes: K/V of the
  seq_len - 1 cached keys read, k_new/v_new read and written once.
  With `qkv_bias` (the `HAS_QKV_BIAS` specialisation, only with the append) the kernel also adds
  the QKV projection's bias `[3, H, D]`: every program adds q's row to q (fp32, before the
  scale), the owner of the new key adds K's and V's rows and rounds them to the cache dtype, so
  it attends to exactly the values it stores and later steps read back. The projection then
  runs bias-free: at batch 1 `F.linear` with a bias is two kernels (bias copy, then GEMM with
  beta = 1), 12 launches per GPT-2 124M step that this removes. Bytes: + 3 * H * D * e per
  batch row (q's row by each split program, K's and V's by the owner), the same 3 * H * D
  elements for every row, so from DRAM once (3 * H * D * e, 4.6 KB for GPT-2 in bf16) and L2 after.

Every path accumulates in fp32; scores of masked keys are -inf; a row with no valid key (a
decode row with seq_len 0) outputs zeros, never NaN.

References: Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023) for the tiled
online softmax; Dao et al., "Flash-Decoding for long-context inference" (2023) for split-KV with
a log-sum-exp merge; Kwon et al., "Efficient Memory Management for LLM Serving with
PagedAttention" (vLLM, 2023) for the paged layout; Triton tutorial 06 (fused attention) for the
structure of the prefill kernel.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .common import TOLERANCES, BenchCase, interpreting, lazy_generator, on_cuda, sm_count

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _kv_cache_write_kernel(
    k_cache_ptr,
    v_cache_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cache_slot,
    stride_cache_h,
    H,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n)  # int64; negative means "do not cache this token"
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < HEAD_DIM)
        # k, v: [N, H, D] (any token/head stride, unit last stride)
        k = tl.load(k_ptr + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        # k_cache: [num_blocks * block_size, H, D] row `slot`
        dst = slot * stride_cache_slot + offs_h[:, None] * stride_cache_h + offs_d[None, :]
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _prefill_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    bt_row_ptr,
    offs_m_pos,
    offs_d,
    mask_d,
    lo,
    hi,
    seq_len,
    stride_k_slot,
    stride_v_slot,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    """Online-softmax update of one query tile over the key tiles [lo, hi).

    CAUSAL=False: every key in [lo, hi) is visible to every row and is < seq_len (no masks).
    CAUSAL=True: key j is visible to row i iff j <= pos(i) and j < seq_len.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if CAUSAL:
            mask_n = offs_n < seq_len
            blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        else:
            blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE)
        # slot of key j: k_cache viewed as [num_blocks * block_size, H, D]
        slot = blk.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        k_ptrs = k_base + slot[:, None] * stride_k_slot + offs_d[None, :]
        v_ptrs = v_base + slot[:, None] * stride_v_slot + offs_d[None, :]
        if CAUSAL:
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=IN_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            visible = (offs_n[None, :] <= offs_m_pos[:, None]) & mask_n[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        # NOTE: every row sees key 0, which lies in the first tile visited, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=IN_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# NOTE: sizes that change from step to step are not specialised on (Triton would otherwise compile
# a variant for 1, for multiples of 16 and for the rest, inside timed or captured runs).
@triton.jit(do_not_specialize=["stride_bt", "max_blocks", "num_m_blocks"])
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    cu_seqlens_ptr,
    seq_lens_ptr,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_on,
    stride_oh,
    stride_k_slot,
    stride_kh,
    stride_v_slot,
    stride_vh,
    stride_bt,
    max_blocks,
    num_m_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # longest causal rows first: the last m-block of a sequence does the most work
    m_block = num_m_blocks - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    start_m = m_block * BLOCK_M
    if start_m < q_len:
        # NOTE: the block table holds max_blocks pages, so clamping keeps every gather in bounds.
        seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_blocks * BLOCK_SIZE)
        ctx_len = seq_len - q_len  # cached prefix: the new tokens are the last q_len positions
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < q_len
        mask_d = offs_d < HEAD_DIM
        q_rows = (q_start + offs_m).to(tl.int64)
        # q: [N, H, D] rows q_start + offs_m, head h
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        offs_m_pos = ctx_len + offs_m  # sequence position of each query row
        bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
        k_base = k_cache_ptr + h * stride_kh
        v_base = v_cache_ptr + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # keys below the tile's first query position are visible to all its rows
        full_hi = ((ctx_len + start_m) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _prefill_tiles(
            acc, m_i, l_i, q, k_base, v_base, bt_row_ptr, offs_m_pos, offs_d, mask_d,
            0, full_hi, seq_len, stride_k_slot, stride_v_slot, qk_scale,
            BLOCK_SIZE, BLOCK_N, False, BLOCK_D == HEAD_DIM, IN_PRECISION,
        )  # fmt: skip
        diag_hi = tl.minimum(seq_len, ctx_len + start_m + BLOCK_M)
        acc, m_i, l_i = _prefill_tiles(
            acc, m_i, l_i, q, k_base, v_base, bt_row_ptr, offs_m_pos, offs_d, mask_d,
            full_hi, diag_hi, seq_len, stride_k_slot, stride_v_slot, qk_scale,
            BLOCK_SIZE, BLOCK_N, True, BLOCK_D == HEAD_DIM, IN_PRECISION,
        )  # fmt: skip
        # rows past q_len are never stored; l_i > 0 for every stored row (it sees key 0)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_on + h * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "max_blocks"])
def _decode_split_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_new_ptr,
    v_new_ptr,
    slot_ptr,
    qkv_bias_ptr,
    bt_ptr,
    seq_lens_ptr,
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
        # NOTE: tl.where, not `mask_d & owns_new`: Triton 3.9's interpreter turns a tensor & scalar
        # bool into int32, which it then refuses as a mask
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
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
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


def _check_launch_device(name: str, *tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    if not on_cuda(device) and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got device {device}; use {name}_ref on the CPU"
        )


def _check_cache(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, qname: str = "q") -> None:
    """q [*, H, D] (called `qname` in errors) against k_cache/v_cache [num_blocks, block_size, H, D]."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"{name}: {qname} dtype must be one of {_DTYPES}, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"{name}: {qname} must be 3-D [tokens, H, D], got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError(f"{name}: {qname}'s last dimension must be contiguous (stride 1), got strides {q.stride()}")
    H, D = q.shape[1], q.shape[2]
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be in 1..{_MAX_HEAD_DIM}, got {D}")
    for cname, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[2] != H or c.shape[3] != D:
            raise ValueError(
                f"{name}: {cname} must be [num_blocks, block_size, H={H}, D={D}], got shape {tuple(c.shape)}"
            )
        if c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"{name}: {cname} needs num_blocks >= 1 and block_size >= 1, got shape {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise ValueError(f"{name}: {cname} dtype {c.dtype} differs from {qname} dtype {q.dtype}")
        if not c.is_contiguous():
            raise ValueError(f"{name}: {cname} must be contiguous, got strides {c.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")


def _check_int_vector(name: str, arg: str, t: torch.Tensor, length: int, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{name}: {arg} must be a 1-D {dtype} tensor of length {length}, "
            f"got {t.dtype} shape {tuple(t.shape)}"
        )


def _check_block_tables(name: str, block_tables: torch.Tensor, batch: int) -> None:
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"{name}: block_tables must be int32 [B={batch}, max_blocks], "
            f"got {block_tables.dtype} shape {tuple(block_tables.shape)}"
        )
    if block_tables.shape[1] > 0 and block_tables.stride(1) != 1:
        raise ValueError(f"{name}: block_tables rows must be contiguous, got strides {block_tables.stride()}")


def _check_scale(name: str, scale) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite Python float, got {scale!r}")
    return float(scale)


def kv_cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the K/V rows of N tokens into their paged-cache slots, in place (Triton).

    Parameters
    ----------
    k, v : Tensor [N, H, D]
        fp16/bf16/fp32 (the cache's dtype), last dimension contiguous (token and head strides
        are free, so the views out of a fused QKV projection need no copy).
    k_cache, v_cache : Tensor [num_blocks, block_size, H, D]
        Contiguous; written in place.
    slot_mapping : Tensor [N], int64
        `block_id * block_size + offset` per token; a negative slot skips the token (e.g. a
        padding token). Slots must be distinct and below `num_blocks * block_size`.

    Examples
    --------
    >>> kv_cache_write(k, v, k_cache, v_cache, slot_mapping)  # k_cache.view(-1, H, D)[slot] = k
    """
    name = "kv_cache_write"
    _check_cache(name, k, k_cache, v_cache, qname="k")
    if v.shape != k.shape or v.dtype != k.dtype or v.stride(-1) != 1:
        raise ValueError(
            f"{name}: v must match k's shape {tuple(k.shape)} and dtype {k.dtype} with a contiguous last "
            f"dimension, got {tuple(v.shape)} {v.dtype} strides {v.stride()}"
        )
    N, H, D = k.shape
    _check_int_vector(name, "slot_mapping", slot_mapping, N, torch.int64)
    _check_launch_device(name, k, v, k_cache, v_cache, slot_mapping)
    if N == 0:
        return
    _kv_cache_write_kernel[(N,)](
        k_cache, v_cache, k, v, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        H,
        HEAD_DIM=D,
        BLOCK_H=triton.next_power_of_2(H),
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )  # fmt: skip


def _prefill_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel.

    Fixed rather than autotuned: prefill shapes change every call, and a config must not depend
    on the first shape seen. fp16/bf16, head_dim <= 64: 128x64 tiles, one warpgroup, 3 stages
    (Triton tutorial 06's Hopper choice for this tile; FlashAttention-2's). Wider heads: 8 warps
    so the [BLOCK_M, D] accumulator fits without spilling. fp32 runs the exact (ieee, FMA) dot
    for the fp32 parity policy, whose register appetite needs small tiles. Checked by compiling
    for sm_90 without a GPU: 248 (d64), 182 (d80/d128), 168 (d256) registers, no spills, wgmma
    (HGMMA) and 16-byte cp.async (LDGSTS.128) K/V loads; fp32 72..122 registers, no spills.
    """
    if dtype == torch.float32:
        if block_d <= 64:
            return 32, 32, 4, 2
        return (16, 16, 4, 2) if block_d <= 128 else (32, 16, 8, 2)
    if block_d <= 64:
        return 128, 64, 4, 3
    return (128, 64, 8, 2) if block_d <= 128 else (64, 32, 8, 2)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    """Causal attention of the new tokens of B sequences over their paged K/V (Triton).

    Sequence b's new tokens are the last `q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]` positions
    `seq_lens[b] - q_len_b .. seq_lens[b] - 1` of the sequence; positions before them are a cached
    prefix. Their K/V (prefix and new tokens) must already be in the cache (`kv_cache_write`
    first). A query at position p attends to keys 0..p.

    Parameters
    ----------
    q : Tensor [N, H, D]
        fp16/bf16/fp32, the new tokens of all sequences flattened; last dimension contiguous.
    k_cache, v_cache : Tensor [num_blocks, block_size, H, D]
        Contiguous, q's dtype.
    block_tables : Tensor [B, max_blocks], int32
        Page ids per sequence (rows contiguous); `seq_lens[b] <= max_blocks * block_size`.
    cu_seqlens_q : Tensor [B + 1], int32
        Prefix sums of the new-token counts, `cu_seqlens_q[0] == 0`, `cu_seqlens_q[B] == N`.
    seq_lens : Tensor [B], int32
        Total length (cached prefix + new tokens) of each sequence, `>= q_len_b`.
    scale : float
        Score scale, e.g. `1 / sqrt(D)`.
    max_seqlen_q : int
        Host int >= every `q_len_b`: sizes the grid without a device sync (query rows past it
        would be left unwritten).

    Returns
    -------
    Tensor [N, H, D], q's dtype.

    Examples
    --------
    >>> out = prefill_attention(q, k_cache, v_cache, block_tables, cu, seq_lens, D ** -0.5, max_q)
    """
    name = "prefill_attention"
    _check_cache(name, q, k_cache, v_cache)
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _check_int_vector(name, "seq_lens", seq_lens, B, torch.int32)
    _check_int_vector(name, "cu_seqlens_q", cu_seqlens_q, B + 1, torch.int32)
    _check_block_tables(name, block_tables, B)
    qk_scale = _check_scale(name, scale) * _LOG2E
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0:
        raise ValueError(f"{name}: max_seqlen_q must be a non-negative Python int, got {max_seqlen_q!r}")
    _check_launch_device(name, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    N, H, D = q.shape
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    if N == 0 or B == 0 or max_seqlen_q == 0:
        return out
    block_size = k_cache.shape[1]
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16
    block_m, block_n, num_warps, num_stages = _prefill_config(block_d, q.dtype)
    num_m_blocks = triton.cdiv(max_seqlen_q, block_m)
    _prefill_kernel[(num_m_blocks, H, B)](
        out, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.shape[1], num_m_blocks,
        HEAD_DIM=D,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        IN_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out


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


def _check_append(
    name: str,
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> bool:
    """Whether decode_attention appends the new token's K/V (all three given) or not (none)."""
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
    _check_int_vector(name, "slot_mapping", slot_mapping, q.shape[0], torch.int64)
    return True


def _check_qkv_bias(name: str, q: torch.Tensor, qkv_bias: torch.Tensor | None, append: bool) -> bool:
    """Whether decode_attention adds the QKV projection's bias (given, with the append) or not."""
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
    _check_cache(name, q, k_cache, v_cache)
    B, H, D = q.shape
    _check_int_vector(name, "seq_lens", seq_lens, B, torch.int32)
    _check_block_tables(name, block_tables, B)
    qk_scale = _check_scale(name, scale) * _LOG2E
    append = _check_append(name, q, k_new, v_new, slot_mapping)
    has_bias = _check_qkv_bias(name, q, qkv_bias, append)
    _check_launch_device(name, q, k_cache, v_cache, block_tables, seq_lens,
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


# Splits of `decode_attention_partials` by default: its merge runs in the next kernel's prologue
# (`proj_residual.attn_merge_linear_residual`), where every program reads all the partials (from
# L2), so fewer splits than the two-kernel path: at batch 1, 12 heads x 8 = 96 programs.
_PARTIALS_MAX_SPLITS = 8


def partials_num_splits(batch: int, heads: int, max_context: int, head_dim: int, device: torch.device) -> int:
    """The default split count of `decode_attention_partials` (static shapes only: CUDA-graph
    safe): `decode_attention`'s choice, at most 8."""
    block_n = _decode_block_n(triton.next_power_of_2(head_dim))
    return min(_PARTIALS_MAX_SPLITS, _decode_num_splits(batch, heads, max_context, block_n, _sm_count(device)))


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
    _check_cache(name, q, k_cache, v_cache)
    B, H, D = q.shape
    _check_int_vector(name, "seq_lens", seq_lens, B, torch.int32)
    _check_block_tables(name, block_tables, B)
    qk_scale = _check_scale(name, scale) * _LOG2E
    append = _check_append(name, q, k_new, v_new, slot_mapping)
    has_bias = _check_qkv_bias(name, q, qkv_bias, append)
    _check_launch_device(name, q, k_cache, v_cache, block_tables, seq_lens,
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


def kv_cache_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Eager reference of `kv_cache_write` (same signature): `cache.view(-1, H, D)[slot] = k`."""
    H, D = k_cache.shape[2], k_cache.shape[3]
    if slot_mapping.device.type == "cpu" and bool((slot_mapping >= 0).all()):
        slots = slot_mapping  # the runtime's case: no padding slots, no masking copies
    else:
        keep = slot_mapping >= 0
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    # caches viewed as [num_blocks * block_size, H, D]: a slot is a row
    k_cache.view(-1, H, D).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, H, D).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, H, D] and pages [..., P] -> [..., P * bs, H, D] (token order)."""
    # index_select on the flattened page ids: faster than advanced indexing on CPU
    g = cache.index_select(0, pages.reshape(-1).long())  # [prod(...) * P, bs, H, D]
    return g.view(*pages.shape[:-1], pages.shape[-1] * cache.shape[1], cache.shape[2], cache.shape[3])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked softmax attention in fp32: q [B, H, Q, D], k/v [B, H, K, D], visible [B, 1, Q, K].

    Rows with no visible key give zeros (not NaN). Computed by PyTorch's fused CPU/CUDA
    attention on fp32 inputs: the same math as softmax(q k^T * scale) v, without materialising
    the probabilities, which keeps the CPU path of the runtime fast.
    """
    empty = ~visible.any(dim=-1, keepdim=True)  # [B, 1, Q, 1]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible | empty,
                                         scale=scale)
    return out.masked_fill(empty, 0.0)


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    """Eager reference of `prefill_attention` (same signature): per sequence, gather its K/V
    through the block table, causal-masked softmax in fp32, cast to q's dtype.

    Reads `cu_seqlens_q` and `seq_lens` on the host (a sync on CUDA: it is the CPU path).
    """
    N, H, D = q.shape
    out = torch.zeros((N, H, D), dtype=q.dtype, device=q.device)
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        if not q_len <= seq_len <= block_tables.shape[1] * block_size:
            raise ValueError(
                f"prefill_attention_ref: sequence {b} has {q_len} new tokens and seq_len {seq_len}; "
                f"need q_len <= seq_len <= max_blocks * block_size = {block_tables.shape[1] * block_size}"
            )
        pages = block_tables[b, : -(-seq_len // block_size)]
        k = _gather_pages(k_cache, pages)[:seq_len].transpose(0, 1)  # [H, seq_len, D]
        v = _gather_pages(v_cache, pages)[:seq_len].transpose(0, 1)
        qb = q[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)
        pos_k = torch.arange(seq_len, device=q.device)
        visible = pos_k[None, :] <= pos_q[:, None]  # [q_len, seq_len]
        o = _attend(qb[None], k[None], v[None], visible[None, None], scale)[0]  # [H, q_len, D]
        out[q_start:q_end] = o.transpose(0, 1).to(q.dtype)
    return out


def _decode_inputs_ref(name, q, k_cache, v_cache, block_tables, seq_lens, k_new, v_new, slot_mapping,
                      qkv_bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `decode_attention_ref` attends with: (q [B, H, D], k, v [B, H, max_blocks * bs, D]),
    the bias added and the new K/V written to the cache and put at their position (see there)."""
    B = q.shape[0]
    append = _check_append(name, q, k_new, v_new, slot_mapping)
    if _check_qkv_bias(name, q, qkv_bias, append):
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
    k = _gather_pages(k_cache, block_tables).transpose(1, 2)  # [B, H, max_blocks * bs, D]
    v = _gather_pages(v_cache, block_tables).transpose(1, 2)
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
    out = _attend(q[:, :, None], k, v, visible[:, None, None, :], scale)  # [B, H, 1, D]
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
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * (scale * _LOG2E)  # [B, H, L]
    scores = torch.where(in_split[:, None], scores[:, :, None, :], float("-inf"))  # [B, H, S, L]
    m = scores.amax(dim=-1)  # [B, H, S]
    p = torch.exp2(scores - torch.where(m == float("-inf"), 0.0, m)[..., None])  # masked keys: 0
    part_acc = p @ v.float()  # [B, H, S, L] @ [B, H, L, D] -> [B, H, S, D]
    part_ml = torch.stack((m, p.sum(dim=-1)), dim=-1)  # [B, H, S, 2]
    return part_acc, part_ml


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


def _random_paged_cache(batch, seq_len, heads, head_dim, block_size, dtype, device, gen):
    """A paged K/V cache holding `batch` sequences of `seq_len` tokens in shuffled pages.

    Returns k_cache, v_cache [num_blocks, bs, H, D], block_tables int32 [B, pages], and the same
    K/V contiguous as [B, seq_len, H, D] (for baselines).
    """
    pages = -(-seq_len // block_size)
    num_blocks = batch * pages + 1  # block 0 is the null block
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen, device=device).to(dtype)
    perm = torch.randperm(num_blocks - 1, generator=gen, device=device) + 1
    block_tables = perm.view(batch, pages).to(torch.int32)
    k = _gather_pages(k_cache, block_tables)[:, :seq_len].contiguous()  # [B, T, H, D]
    v = _gather_pages(v_cache, block_tables)[:, :seq_len].contiguous()
    return k_cache, v_cache, block_tables, k, v


class _BaselineInputs:
    """Tensors a baseline needs besides the op's args (e.g. a contiguous K/V copy), built in
    make_args so that building them is not timed, found again from the args' `q` by identity
    and dropped when that `q` is freed (the runner may keep many rotation buffers). A baseline
    carries its store as `.inputs`."""

    def __init__(self):
        self._by_q: dict[int, tuple] = {}

    def put(self, q: torch.Tensor, extra: tuple) -> None:
        self._by_q[id(q)] = extra
        weakref.finalize(q, self._by_q.pop, id(q), None)

    def get(self, q: torch.Tensor) -> tuple:
        return self._by_q[id(q)]



def _prefill_case(device, batch, seq_len, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """B sequences of `seq_len` new tokens, no cached prefix.

    The SDPA baseline gets the same args as the op; the contiguous K/V it runs on are built by
    make_args (not timed) and found from q.
    """
    contiguous_kv = _BaselineInputs()
    gen = lazy_generator(device, 1234 + seq_len)

    def make_args():
        k_cache, v_cache, block_tables, k, v = _random_paged_cache(
            batch, seq_len, heads, head_dim, block_size, dtype, device, gen()
        )
        q = torch.randn(batch * seq_len, heads, head_dim, generator=gen(), device=device).to(dtype)
        cu = torch.arange(0, batch * seq_len + 1, seq_len, device=device, dtype=torch.int32)
        lens = torch.full((batch,), seq_len, device=device, dtype=torch.int32)
        # [B, T, H, D] -> [B, H, T, D] views: the layout SDPA's flash kernel takes without a copy
        contiguous_kv.put(q, (k.transpose(1, 2), v.transpose(1, 2)))
        return (q, k_cache, v_cache, block_tables, cu, lens, head_dim**-0.5, seq_len)

    def sdpa(q, k_cache, v_cache, block_tables, cu, lens, scale, max_seqlen_q):
        k, v = contiguous_kv.get(q)
        qt = q.view(batch, seq_len, heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(batch * seq_len, heads, head_dim)  # [N, H, D]

    sdpa.inputs = contiguous_kv

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="prefill_attention",
        label=f"B={batch} T={seq_len} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=4 * batch * seq_len * heads * head_dim * e,
        flops=2 * batch * heads * seq_len * seq_len * head_dim,  # 4*B*H*T*T*D/2: the causal half
        params=dict(B=batch, T=seq_len, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        baselines={"sdpa": sdpa},
        **TOLERANCES[dtype],
    )


def _decode_case(device, batch, context, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """B sequences with `context` keys each. The SDPA baseline runs on the already-gathered
    contiguous cache [B, H, context, D] (built by make_args, not timed, and found from q).
    """
    contiguous_kv = _BaselineInputs()
    gen = lazy_generator(device, 4321 + context)

    def make_args():
        k_cache, v_cache, block_tables, k, v = _random_paged_cache(
            batch, context, heads, head_dim, block_size, dtype, device, gen()
        )
        q = torch.randn(batch, heads, head_dim, generator=gen(), device=device).to(dtype)
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        contiguous_kv.put(q, (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()))
        return (q, k_cache, v_cache, block_tables, lens, head_dim**-0.5)

    def sdpa(q, k_cache, v_cache, block_tables, lens, scale):
        k, v = contiguous_kv.get(q)  # [B, H, context, D]
        o = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale)
        return o.squeeze(2)  # [B, H, D]

    sdpa.inputs = contiguous_kv

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="decode_attention",
        label=f"B={batch} ctx={context} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=(2 * batch * context + 2 * batch) * heads * head_dim * e,
        flops=4 * batch * heads * context * head_dim,
        params=dict(B=batch, context=context, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        baselines={"sdpa": sdpa},
        **TOLERANCES[dtype],
    )


def _decode_append_case(device, batch, context, heads, head_dim, dtype, block_size=16, bias=False) -> BenchCase:
    """B sequences with `context` keys, the last of which (position context - 1) is the new token
    that the op appends; q, k_new and v_new are views of one [B, 3, H, D] projection output.

    Baseline "write_then_decode": the unfused step, `kv_cache_write` then `decode_attention`
    (the Triton launchers on CUDA, the references elsewhere), on the same args.
    With `bias` the args end with a QKV bias [3, H, D] that the op adds; baseline
    "add_then_append" instead adds it to the [B, 3, H, D] projection output in one elementwise
    kernel (out of place: the args stay unchanged), then runs the append without the bias.
    """
    gen = lazy_generator(device, 5678 + context + int(bias))
    on_cuda = device.startswith("cuda")
    projections = _BaselineInputs()  # the [B, 3, H, D] tensor that q, k_new, v_new view

    def make_args():
        g = gen()
        k_cache, v_cache, block_tables, _, _ = _random_paged_cache(
            batch, context, heads, head_dim, block_size, dtype, device, g
        )
        qkv = torch.randn(batch, 3, heads, head_dim, generator=g, device=device).to(dtype)  # [B, 3, H, D]
        pos = context - 1
        slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B]
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        args = (qkv[:, 0], k_cache, v_cache, block_tables, lens, head_dim**-0.5, qkv[:, 1], qkv[:, 2], slots)
        if not bias:
            return args
        projections.put(args[0], (qkv,))
        return (*args, torch.randn(3, heads, head_dim, generator=g, device=device).to(dtype))

    def write_then_decode(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots):
        write, attend = (kv_cache_write, decode_attention) if on_cuda else (kv_cache_write_ref, decode_attention_ref)
        write(k_new, v_new, k_cache, v_cache, slots)
        return attend(q, k_cache, v_cache, block_tables, lens, scale)

    def add_then_append(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots, qkv_bias):
        (qkv,) = projections.get(q)
        biased = qkv + qkv_bias  # [B, 3, H, D]
        attend = decode_attention if on_cuda else decode_attention_ref
        return attend(biased[:, 0], k_cache, v_cache, block_tables, lens, scale, biased[:, 1], biased[:, 2], slots)

    add_then_append.inputs = projections

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="decode_attention",
        label=(f"B={batch} ctx={context} H={heads} D={head_dim} bs={block_size} "
               f"{str(dtype).removeprefix('torch.')} +append" + ("+bias" if bias else "")),
        make_args=make_args,
        # cached K/V read; q, k_new, v_new read; the new K/V and the output written; the bias
        # (the same for every row) read once from DRAM
        bytes_moved=(2 * batch * (context - 1) + 6 * batch + 3 * bias) * heads * head_dim * e,
        flops=4 * batch * heads * context * head_dim,
        params=dict(B=batch, context=context, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype),
                    append=True, qkv_bias=bias),
        baselines={"add_then_append": add_then_append} if bias else {"write_then_decode": write_then_decode},
        **TOLERANCES[dtype],
    )


def _decode_partials_case(device, batch, context, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """The small-batch decode step's attention: `decode_attention_partials` with the append (the
    merge runs in the next kernel). Baseline "split_and_merge": `decode_attention` with the append,
    the split pass and its merge kernel (two launches) on the same args. Bytes as the append
    case plus the fp32 partials written (at most 8 splits)."""
    gen = lazy_generator(device, 6789 + context)
    on_cuda = device.startswith("cuda")

    def make_args():
        g = gen()
        k_cache, v_cache, block_tables, _, _ = _random_paged_cache(
            batch, context, heads, head_dim, block_size, dtype, device, g
        )
        qkv = torch.randn(batch, 3, heads, head_dim, generator=g, device=device).to(dtype)  # [B, 3, H, D]
        pos = context - 1
        slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B]
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        return (qkv[:, 0], k_cache, v_cache, block_tables, lens, head_dim**-0.5, qkv[:, 1], qkv[:, 2], slots)

    def split_and_merge(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots):
        attend = decode_attention if on_cuda else decode_attention_ref
        return attend(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots)

    splits = _PARTIALS_MAX_SPLITS  # the bound: the count needs the GPU's SM count (not asked here)
    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="decode_attention_partials",
        label=f"B={batch} ctx={context} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')} +append",
        make_args=make_args,
        bytes_moved=(2 * batch * (context - 1) + 5 * batch) * heads * head_dim * e
        + 4 * batch * heads * splits * (head_dim + 2),
        flops=4 * batch * heads * context * head_dim,
        params=dict(B=batch, context=context, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        baselines={"split_and_merge": split_and_merge},
        atol=TOLERANCES[dtype]["atol"] * 10, rtol=TOLERANCES[dtype]["rtol"],
    )


def _kv_write_case(device, tokens, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """`tokens` new K/V rows scattered to random distinct slots of a cache with room for them."""
    gen = lazy_generator(device, 99 + tokens)
    num_blocks = -(-tokens // block_size) * 2 + 1

    def make_args():
        g = gen()
        k = torch.randn(tokens, heads, head_dim, generator=g, device=device).to(dtype)
        v = torch.randn(tokens, heads, head_dim, generator=g, device=device).to(dtype)
        k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g, device=device).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g, device=device).to(dtype)
        slots = torch.randperm((num_blocks - 1) * block_size, generator=g, device=device)[:tokens]
        return (k, v, k_cache, v_cache, slots + block_size)  # never the null block

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="kv_cache_write",
        label=f"N={tokens} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=2 * 2 * tokens * heads * head_dim * e,  # K and V, each read once and written once
        params=dict(N=tokens, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        atol=0.0,
        rtol=0.0,
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """Prefill and decode configurations (GPT-2: H=12, D=64, block_size 16).

    kv_cache_write: N new tokens' K/V scattered into the cache (bytes = read + write).
    cuda: prefill B=4 (B*H=48) at T=128..1024 (and B=16 T=512) in fp16/bf16, FLOPs counted for
    the causal half; decode at contexts 128..4096 and batch 1..256 in bf16 (fp16 at one point),
    bytes = K/V read. cpu: one tiny fp32 case of each (the reference runs against itself or the
    interpreter). Baseline "sdpa" on both: prefill = SDPA's flash backend on [B, H, T, D] views
    of contiguous q/K/V; decode = SDPA (its own backend choice) on a contiguous, already gathered
    [B, H, context, D] cache. Decode with the K/V append fused ("+append", B 1..256 at context
    1024) has baseline "write_then_decode": the separate `kv_cache_write` and `decode_attention`
    launches it replaces. The same with the QKV bias fused as well ("+append+bias", what the
    model's decode step runs) has baseline "add_then_append": the bias added to the projection
    output by a separate elementwise kernel, then the append op. Baselines take the op's args;
    their extra inputs are built by make_args, so that setup is not timed. `decode_attention_partials`
    (the small-batch step's attention, its merge done by the next kernel) at B 1 and 8, context
    384 (the batch-1 benchmark's 128 + 256 tokens; full: also B=1 at 1024), has baseline "split_and_merge":
    `decode_attention` with the append, split pass + merge kernel.
    """
    if device == "cpu":
        return [
            _prefill_case("cpu", 2, 32, 2, 16, torch.float32, block_size=8),
            _decode_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8),
            _decode_append_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8),
            _decode_append_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8, bias=True),
            _kv_write_case("cpu", 5, 2, 16, torch.float32, block_size=8),
            _decode_partials_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8),
        ]
    fp16, bf16 = torch.float16, torch.bfloat16
    if quick:
        prefill = [(4, 1024, fp16), (4, 1024, bf16), (4, 128, bf16)]
        decode = [(1, 1024, bf16), (8, 1024, bf16), (64, 1024, bf16), (1, 4096, bf16), (256, 1024, bf16)]
        append = [1, 256]
    else:
        prefill = [(4, t, dt) for dt in (fp16, bf16) for t in (128, 512, 1024)] + [(16, 512, bf16)]
        decode = [(b, c, bf16) for c in (128, 1024, 4096) for b in (1, 8, 64, 256) if b * c <= 256 * 1024]
        decode += [(8, 1024, fp16)]
        append = [1, 64, 256]
    cases = [_prefill_case(device, b, t, 12, 64, dt) for b, t, dt in prefill]
    cases += [_decode_case(device, b, c, 12, 64, dt) for b, c, dt in decode]
    # the decode step as the model runs it: K/V append fused, against write + decode
    cases += [_decode_append_case(device, b, 1024, 12, 64, bf16, bias=bias) for bias in (False, True) for b in append]
    # the decode step's append (one token per sequence) and a prefill's (whole prompts)
    cases += [_kv_write_case(device, n, 12, 64, bf16) for n in ((256, 8192) if quick else (1, 256, 8192))]
    # the small-batch step's attention: partials only, the merge folded into the out-projection
    cases += [_decode_partials_case(device, b, c, 12, 64, bf16) for b, c in ((1, 384), (8, 384)) + (() if quick else ((1, 1024),))]
    return cases

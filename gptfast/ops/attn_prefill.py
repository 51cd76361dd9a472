"""`prefill_attention`: causal attention of the new tokens of B sequences over their paged K/V.

What it computes: for each sequence, its new tokens are the last positions of the sequence
(after a cached prefix); a query at position p attends to keys 0..p, read through the block
table from the paged cache (layout and math in `paged`). The new tokens' K/V must already be
in the cache (`kv_cache_write` first).

Why fused: one launch for the whole ragged batch, the K/V gathered page by page inside the
kernel, so there is neither a padded [B, T] batch nor a contiguous copy of the cache; the scores
never leave registers (flash attention's online softmax).

Kernel and floors: grid `(cdiv(max_seqlen_q, BLOCK_M), H, B)`, the m-blocks in reverse order so
the longest causal rows start first. Each program keeps a `[BLOCK_M, D]` q tile and walks the
keys in `BLOCK_N` tiles, each tile gathered through the block table one token row at a time (so
any block size works, powers of 2 or not). Keys below the tile's first query position need no
causal mask and run in an unmasked loop; the diagonal tiles run a second, masked loop. FLOPs
(two matmuls, causal half): 4 * H * D * sum_b q_len_b * (ctx_b + q_len_b / 2), i.e.
2 * B * H * T^2 * D for B prompts of T tokens. Bytes: q and out, K/V once:
(2 * N + 2 * sum_b seq_len_b) * H * D * e. B=4, T=1024, H=12, D=64: 6.4 GFLOP (8.2 us at
790 TFLOP/s) against 25 MB (8.4 us at 3 TB/s); softmax keeps attention well below matmul peak,
so in practice the FLOPs set the floor.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_block_tables, check_int_vector, check_launch_device, check_paged_cache, check_scale
from .paged import LOG2E, gather_pages, masked_attention

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _prefill_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_base,  # head h of k_cache: [num_blocks * block_size, D] rows, slot stride stride_k_slot
    v_base,  # head h of v_cache: [num_blocks * block_size, D] rows, slot stride stride_v_slot
    bt_row_ptr,  # [max_blocks] int32, the block-table row of this sequence
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
    out_ptr,  # [N, H, D] q's dtype, strides (stride_on, stride_oh, 1); written
    q_ptr,  # [N, H, D] fp16/bf16/fp32, strides (stride_qn, stride_qh, 1)
    k_cache_ptr,  # [num_blocks, block_size, H, D] contiguous, q's dtype
    v_cache_ptr,  # [num_blocks, block_size, H, D] contiguous, q's dtype
    bt_ptr,  # [B, max_blocks] int32, row stride stride_bt, unit column stride
    cu_seqlens_ptr,  # [B + 1] int32, prefix sums of the new-token counts
    seq_lens_ptr,  # [B] int32, cached prefix + new tokens per sequence
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


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


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
    check_paged_cache(name, q, k_cache, v_cache)
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_int_vector(name, "seq_lens", seq_lens, B, torch.int32)
    check_int_vector(name, "cu_seqlens_q", cu_seqlens_q, B + 1, torch.int32)
    check_block_tables(name, block_tables, B)
    qk_scale = check_scale(name, scale) * LOG2E
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0:
        raise ValueError(f"{name}: max_seqlen_q must be a non-negative Python int, got {max_seqlen_q!r}")
    check_launch_device(name, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
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


# --------------------------------------------------------------------------------------------
# reference (eager PyTorch, fp32 math; the CPU path of the runtime)
# --------------------------------------------------------------------------------------------


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
        k = gather_pages(k_cache, pages)[:seq_len].transpose(0, 1)  # [H, seq_len, D]
        v = gather_pages(v_cache, pages)[:seq_len].transpose(0, 1)
        qb = q[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)
        pos_k = torch.arange(seq_len, device=q.device)
        visible = pos_k[None, :] <= pos_q[:, None]  # [q_len, seq_len]
        o = masked_attention(qb[None], k[None], v[None], visible[None, None], scale)[0]  # [H, q_len, D]
        out[q_start:q_end] = o.transpose(0, 1).to(q.dtype)
    return out

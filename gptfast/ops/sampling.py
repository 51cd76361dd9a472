"""Sampling: logits [B, V] -> one token id per row, in one or two launches, with HF's warpers.

Math (per row, transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper with
min_tokens_to_keep=1, then a draw from the renormalised softmax):

    x_i    = logit_i / T                          (T <= 0: a greedy row, token = argmax logit_i)
    top-k  keeps x_i >= v_k, v_k the k-th largest x (ties at v_k kept); k = 0 or k >= V: off
    top-p  on q = softmax(x over the top-k set): keeps x_i iff  sum_{x_j > x_i} q_j < p
           (HF removes a token when its ascending cumulative probability is <= 1 - p; for
           distinct values the two rules are the same set; the top token is always kept)
    draw   token ~ q restricted to the kept set, renormalised

Ties at the top-p boundary: every token tied with the smallest kept value is kept (HF keeps the
tied tokens its unstable sort happens to put last, so our set contains HF's and differs from it
only by tokens of exactly equal value). Both `sample` and `sample_ref` use this rule.

Sort-free. Write key(x) for the order-preserving map of an fp32 value to an int32 (sign-magnitude
flip; -0.0 mapped to +0.0's key). Both filters keep a set {key(x) >= j*} where j* is the largest
integer j with f(j) >= target, f nonincreasing:

    top-k: f(j) = #{key >= j},                 target = k
    top-p: f(j) = sum_{key >= j} exp(x - m),   target = p * Z_k  (Z_k: the same sum over the top-k set)

j* is found by a bracketing search over [lo, hi) (f(lo) >= target > f(hi)). Each pass evaluates f
at NP = 8 pivots at once: 2 evenly spaced in key space (guaranteed progress, handles masks like
-1e30 / -inf) and 6 in value space around the point where log f, interpolated between the bracket
ends, meets the target; the bracket then shrinks to the smallest/largest key present in it. The
search stops when the bracket holds one distinct key (or, for top-k, exactly k keys are >= lo).
The passes re-read the row (from L2) only until at most CAP = 8192 keys are >= lo: one more pass
copies those (value, column) pairs to a per-row scratch row, and the rest of both searches and the
draw run on that short row. For top-k <= a few thousand (or a top-p set of that size) a row costs:
pass 1 (the DRAM read), typically one search pass, the copy pass, then work on <= CAP entries.
Top-p sets larger than CAP stay on the full row (5-9 search passes and a full draw pass).
Each row pass walks the row in chunks of BLOCK = 1024 columns with 16 warps, loading the next
chunk while the current one is processed.

Pass 1 (the DRAM read: max, lowest argmax, flags, key range, and the draw for rows without
filters) runs in one of two ways, with the same result bit for bit:
- per row (batches > 32): the row's program keeps per-lane running partials over the chunks and
  reduces them once at the end (no block-wide reduction per chunk, except the draw's);
- split (batches <= 32): `_sample_split_kernel` runs one program per (row, chunk), ceil(V / 1024)
  = 50 programs per GPT-2 row (grid (B, 50): 50 CTAs at B = 1), each writing 8 partials; the row's
  program then combines them (one cross-CTA reduction, in a second small launch) and goes on with
  the searches. Max, argmax, counts and key ranges are exact in any order, and the draw (below)
  is defined per chunk with integer sums, so both ways give the same tokens for the same seed.

The draw is exact and needs no normaliser, as a race between chunks: chunk c (BLOCK columns of
the row, or of the scratch row) has weights w_i = exp(x_i - m_c) (m_c its largest kept value),
held in fixed point (units of 2^-32, so W_c = sum w_i and the CDF are exact integers in any
order); it picks a column by inverse CDF over w with a uniform u0, and enters the race with
score m_c + log W_c + G, G = -log(-log u1) a Gumbel variate. The chunk with the largest score
(the lowest one on a tie) gives the token: P(chunk c) = W_c e^{m_c} / sum, so P(i) = e^{x_i} /
sum over the kept set. Each chunk uses one Philox call keyed by the row's seed, counter (chunk,
offset): a row's draw depends only on its own seed, step offset and logits. Probabilities are
resolved to ~2^-32 of a chunk's largest weight (a token below that is never drawn) and uniforms
to 2^-32 (u0) and 2^-24 (u1).

Rows with filters off (k off, p = 1) and greedy rows are done in pass 1. NaN or +inf
(after temperature scaling) flags a row with status 1, a row with no finite logit with status 2;
flagged rows get token -1. Temperatures, top-k and top-p values are read on the device and not
validated here (that would sync); negative top-k counts as off, top-p <= 0 keeps the top token(s).

Bytes moved: B*V*elem_size (the logits read once from DRAM; later passes hit L2 at realistic B:
a 50257-wide fp32 row is 201 KB) + 12*B bytes of outputs, plus scratch traffic of at most
8*CAP bytes per filtered row, plus 32 bytes per (row, chunk) of partials on the split path.
FLOPs: ~3*NP per logit per search pass. Loads are vectorised when the row stride is a multiple
of 16 elements (a logits buffer allocated [B, round_up(V, 64)], passed as a strided view).

References: transformers generation/logits_process.py (the warpers); Gumbel (1954) / the
Gumbel-max trick (the race between chunks); Salmon et al. (2011), Philox.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .common import interpreting, on_cuda

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024  # columns per chunk: with 16 warps the [BLOCK, NP] pivot compares take 16 registers
_NUM_WARPS = 16  # the per-row kernel: 128 registers, no spills (sm_90)
_SPLIT_WARPS = 8  # the split pass 1: one chunk per program
# Up to this many rows, pass 1 is split: one program per (row, chunk), ~50 per GPT-2 row, then a
# small per-row kernel combines them (a single program per row would leave most SMs idle).
_SPLIT_MAX_BATCH = 32
_SPLIT_MIN_CHUNKS = 2  # a row of one chunk has nothing to split
_NUM_PARTS = 8  # partials per (row, chunk) of the split pass 1
_CAP = 8192  # scratch slots per row: once <= _CAP keys are >= lo, the search goes on in the scratch
_NUM_PIVOTS = 8  # pivots per search pass (2 in key space, 6 in value space)
_MAX_PASSES = 40  # safety bound; the key-space pivots alone finish 32-bit keys in 21 passes


@triton.jit
def _key(x):
    """Order-preserving int32 key of fp32 `x` (-0.0 and +0.0 share key 0)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def _unkey(key):
    """Inverse of `_key`: the fp32 value of an int32 key."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_scaled(row_ptr, stride_v, cols, V, div):
    """fp32 logits of one chunk divided by `div` (T, or 1 for greedy rows); -inf past V."""
    raw = tl.load(row_ptr + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32)
    return raw / div


@triton.jit
def _chunk_draw(x, cols, keep, seed, chunk, off_lo, off_hi):
    """One chunk's part of the draw: a column by inverse CDF over w_i = exp(x_i - m_c) (m_c the
    chunk's largest kept value) and the chunk's race score log(W_c) + m_c + Gumbel noise.

    Weights are fixed point (units of 2^-32 of the chunk's largest), so W_c and the CDF are exact
    integer sums: any reduction order (any kernel, any layout) gives the same bits, and the split
    and per-row variants draw the same token. Returns (score, column; -inf, BIG when no weight).
    """
    mc = tl.max(tl.where(keep, x, float("-inf")), axis=0)
    safe = tl.where(mc == float("-inf"), 0.0, mc)
    w = tl.where(keep & (x > float("-inf")), tl.exp(x - safe), 0.0)
    wi = (w * 4294967296.0 + 0.5).to(tl.int64)
    cdf = tl.cumsum(wi, axis=0)
    total = tl.sum(wi, axis=0)
    zero = off_lo * 0
    r0, r1, _r2, _r3 = tl.philox(seed, (zero + chunk).to(tl.uint32), off_lo, off_hi, zero)
    target = (r0.to(tl.float64) * 2.3283064365386963e-10 * total.to(tl.float64)).to(tl.int64)  # [0, W)
    local = tl.min(tl.where(cdf > target, cols, 2147483647), axis=0)
    u1 = ((r1 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 24 bits -> (0, 1)
    score = tl.where(total > 0, safe + tl.log(tl.maximum(total, 1).to(tl.float32)) - tl.log(-tl.log(u1)),
                     float("-inf"))
    return score, local


@triton.jit
def _offset_words(offset):
    return (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _scan(row_ptr, stride_v, V, div, thr_key, draw, seed, offset, BLOCK: tl.constexpr):
    """One pass over a row: max, lowest argmax, flags, key range (per-lane running partials,
    reduced once at the end) and (when `draw`) an exact draw among key >= thr_key.

    Returns (m, argmax, n_bad, n_finite, min_key, max_key, drawn column or BIG).
    """
    lanes = tl.arange(0, BLOCK)
    m_l = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: largest value (NaN skipped)
    arg_l = tl.zeros([BLOCK], dtype=tl.int32)  # its first column
    bad_l = tl.zeros([BLOCK], dtype=tl.int32)
    fin_l = tl.zeros([BLOCK], dtype=tl.int32)
    kmin_l = tl.full([BLOCK], 2147483647, tl.int32)
    kmax_l = tl.full([BLOCK], -2147483647 - 1, tl.int32)
    best = tl.full([], float("-inf"), tl.float32)  # the race: the chunk with the largest score wins
    pick = tl.full([], 2147483647, tl.int32)
    off_lo, off_hi = _offset_words(offset)
    x_next = _load_scaled(row_ptr, stride_v, lanes, V, div)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        x = x_next
        x_next = _load_scaled(row_ptr, stride_v, cols + BLOCK, V, div)  # in flight while x is used
        valid = cols < V
        key = _key(x)
        bad = (x != x) | (x == float("inf"))
        better = x > m_l
        arg_l = tl.where(better, cols, arg_l)
        m_l = tl.where(better, x, m_l)
        bad_l += bad.to(tl.int32)
        fin_l += ((x > float("-inf")) & ~bad).to(tl.int32)
        kmin_l = tl.minimum(kmin_l, tl.where(valid, key, 2147483647))
        kmax_l = tl.maximum(kmax_l, tl.where(valid, key, -2147483647 - 1))
        if draw:
            score, local = _chunk_draw(x, cols, valid & (key >= thr_key), seed, start // BLOCK, off_lo, off_hi)
            pick = tl.where(score > best, local, pick)  # strict: ties go to the lowest chunk
            best = tl.maximum(best, score)
    m = tl.max(m_l, axis=0)
    arg = tl.min(tl.where(m_l == m, arg_l, 2147483647), axis=0)
    return (m, arg, tl.sum(bad_l, axis=0), tl.sum(fin_l, axis=0), tl.min(kmin_l, axis=0),
            tl.max(kmax_l, axis=0), pick)


@triton.jit
def _search(row_ptr, stride_v, V, div, m, lo, hi, base, k, p, f_lo, z, stop_count,
            TOP_P: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Largest key j with f(j) >= target, given f(lo) >= target > f(hi) (see the module docstring).

    TOP_P=False: f = count of keys >= j, target = k. TOP_P=True: f = exp-mass of keys >= j,
    target = p * z, z the mass of keys >= base (z < 0: not known yet, summed on the first pass).
    `f_lo` is f(lo), or < 0 when not known yet. Stops early once at most `stop_count` keys are
    >= lo (the caller then moves those to a scratch row and goes on there).
    Returns (lo, hi, f_lo, count of keys >= lo (an upper bound until lo first moves), z); the kept
    set is key >= lo once the search finished (not stopped early).
    Pivots: 2 evenly spaced in key space (progress on any data), NP - 2 in value space around the
    value where log f, interpolated linearly between the bracket ends, meets the target (evenly
    spread on a first top-p pass, before the target is known).
    """
    lanes = tl.arange(0, BLOCK)
    jj = tl.arange(0, NP)
    is_key = jj < 2
    frac_k = (jj + 1).to(tl.int64)  # pivots lo + span/3, lo + 2 span/3 (used for jj < 2)
    # value-space offsets around the estimate, as fractions of the bracket: -0.15 .. +0.15
    rel = (jj - 2).to(tl.float32) / (NP - 3) * 2.0 - 1.0  # -1 .. 1
    spread = tl.where(rel < 0, -1.0, 1.0) * 0.15 * rel * rel
    even = (jj - 1).to(tl.float32) / (NP - 1)  # evenly spaced in (0, 1)
    lo = lo.to(tl.int32)
    hi = hi.to(tl.int32)
    f_hi = 0.0 * m  # f(hi): in every use, nothing lies at or above the entry hi
    c_lo = V + 0 * lo  # count of keys >= lo: every key on entry from the first pass
    if not TOP_P:
        c_lo = f_lo.to(tl.int32)
    done = hi <= lo + 1
    n_pass = tl.zeros([], dtype=tl.int32)
    while (~done) & (n_pass < MAX_PASSES) & (c_lo > stop_count):
        span = hi.to(tl.int64) - lo.to(tl.int64)
        piv_k = (lo.to(tl.int64) + span * frac_k // 3).to(tl.int32)
        a = _unkey(lo)
        b = _unkey(hi - 1)
        if TOP_P:
            target_est = p * z
        else:
            target_est = k.to(tl.float32) + 0.0 * m
        la = tl.log(tl.maximum(f_lo, 1e-30))
        lb = tl.log(tl.maximum(tl.maximum(f_hi, 0.25 * target_est), 1e-30))
        t_est = tl.where(la > lb, (la - tl.log(tl.maximum(target_est, 1e-30))) / tl.where(la > lb, la - lb, 1.0), 0.5)
        t_est = tl.minimum(tl.maximum(t_est, 0.0), 1.0)
        frac_v = tl.where(f_lo < 0.0, even, t_est + spread)
        pv = a + (b - a) * tl.minimum(tl.maximum(frac_v, 0.0), 1.0)
        piv_v = tl.minimum(tl.maximum(_key(pv), lo + 1), hi - 1)
        # NOTE: int arithmetic, not `&`: the interpreter cannot `&` a scalar bool with a block
        finite = (a > float("-inf")).to(tl.int32) * (b < float("inf")).to(tl.int32)
        use_v = (1 - is_key.to(tl.int32)) * finite > 0
        # where a bracket end is infinite, the value pivots fall back to even key-space spacing
        piv_k6 = (lo.to(tl.int64) + span * (jj + 1).to(tl.int64) // (NP + 1)).to(tl.int32)
        piv = tl.where(use_v, piv_v, tl.where(is_key, piv_k, piv_k6))
        f = tl.zeros([NP], dtype=tl.float32)
        cnt = tl.zeros([NP], dtype=tl.int32)
        tot = 0.0
        mn = 2147483647
        mx = -2147483647 - 1
        x_next = _load_scaled(row_ptr, stride_v, lanes, V, div)
        for start in range(0, V, BLOCK):
            cols = start + lanes
            x = x_next
            x_next = _load_scaled(row_ptr, stride_v, cols + BLOCK, V, div)  # in flight while x is used
            key = _key(x)
            valid = cols < V
            ge = (key[:, None] >= piv[None, :]) & valid[:, None]  # [BLOCK, NP]
            cnt += tl.sum(ge.to(tl.int32), axis=0)
            if TOP_P:
                w = tl.where(valid & (key >= base) & (x > float("-inf")), tl.exp(x - m), 0.0)
                f += tl.sum(tl.where(ge, w[:, None], 0.0), axis=0)
                tot += tl.sum(w, axis=0)
            inside = valid & (key >= lo) & (key < hi)
            mn = tl.minimum(mn, tl.min(tl.where(inside, key, 2147483647), axis=0))
            mx = tl.maximum(mx, tl.max(tl.where(inside, key, -2147483647 - 1), axis=0))
        if TOP_P:
            z = tl.where(z < 0.0, tot, z)
            f_lo = tl.where(f_lo < 0.0, z, f_lo)
            target = p * z
        else:
            f = cnt.to(tl.float32)
            target = k.to(tl.float32)
        ok = f >= target
        best_ok = tl.max(tl.where(ok, piv, -2147483647 - 1), axis=0)
        best_no = tl.min(tl.where(ok, 2147483647, piv), axis=0)
        moved = best_ok > lo
        f_lo = tl.where(moved, tl.min(tl.where(ok, f, float("inf")), axis=0), f_lo)
        c_lo = tl.where(moved, tl.min(tl.where(ok, cnt, 2147483647), axis=0), c_lo)
        f_hi = tl.where(best_no < hi, tl.max(tl.where(ok, float("-inf"), f), axis=0), f_hi)
        new_lo = tl.maximum(lo, best_ok)
        new_hi = tl.minimum(hi, best_no)
        # NOTE: no key lies in [old lo, mn) or (mx, old hi), so f and counts are unchanged by the tightening.
        single = mn == mx
        lo = tl.maximum(new_lo, mn)
        hi = tl.minimum(new_hi, mx + 1)
        done = single | (hi <= lo + 1)
        if not TOP_P:
            done = done | (f_lo == target)
        n_pass += 1
    return lo, hi, f_lo, c_lo, z


@triton.jit
def _compact(row_ptr, stride_v, V, div, thr_key, sx_ptr, sc_ptr, BLOCK: tl.constexpr):
    """Copy the scaled logits with key >= thr_key and their columns, in column order, to a scratch row.

    The caller guarantees that the scratch row has room. Returns how many were copied.
    """
    lanes = tl.arange(0, BLOCK)
    n = 0
    x_next = _load_scaled(row_ptr, stride_v, lanes, V, div)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        x = x_next
        x_next = _load_scaled(row_ptr, stride_v, cols + BLOCK, V, div)  # in flight while x is used
        sel = (cols < V) & (_key(x) >= thr_key)
        pos = n + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(sx_ptr + pos, x, mask=sel)
        tl.store(sc_ptr + pos, cols, mask=sel)
        n += tl.sum(sel.to(tl.int32), axis=0)
    # NOTE: other threads of this program read the scratch row next
    tl.debug_barrier()
    return n


@triton.jit
def _sample_split_kernel(
    part_ptr,  # [B, 8, C] int32 contiguous: per-chunk partials (floats bit-cast); written
    logits_ptr,  # [B, V] fp16/bf16/fp32, strides (stride_b, stride_v)
    stride_b,
    stride_v,
    temp_ptr,  # [B] fp32 temperature (<= 0: greedy)
    topk_ptr,  # [B] int32 top-k (0: off)
    topp_ptr,  # [B] fp32 top-p (1.0: off)
    seed_ptr,  # [B] int64 Philox key per row
    offset_ptr,  # [B] int64 Philox offset per row
    V,
    C,
    BLOCK: tl.constexpr,
):
    """Pass 1 split: program (row, c) scans chunk c of the row (one DRAM read of it) and writes
    the chunk's partials to part[row, :, c] (int32; floats bit-cast): max, its lowest column,
    #bad, #finite, min key, max key, race score, drawn column (the draw only for rows without
    filters). `_sample_kernel` (SPLIT) combines them exactly as its own pass 1 combines chunks."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    t = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    greedy = t <= 0.0
    div = tl.where(greedy, 1.0, t)
    draw = (~greedy) & ~(((k > 0) & (k < V)) | (p < 1.0))
    cols = c * BLOCK + tl.arange(0, BLOCK)
    x = _load_scaled(logits_ptr + row.to(tl.int64) * stride_b, stride_v, cols, V, div)
    valid = cols < V
    key = _key(x)
    bad = (x != x) | (x == float("inf"))
    m = tl.max(tl.where(x == x, x, float("-inf")), axis=0)
    arg = tl.min(tl.where(x == m, cols, 2147483647), axis=0)
    arg = tl.where(m == float("-inf"), c * 0, arg)  # nothing above -inf: as the per-lane scan
    score = tl.full([], float("-inf"), tl.float32)
    pick = tl.full([], 2147483647, tl.int32)
    if draw:
        off_lo, off_hi = _offset_words(tl.load(offset_ptr + row))
        score, pick = _chunk_draw(x, cols, valid, tl.load(seed_ptr + row), c, off_lo, off_hi)
    out = part_ptr + row.to(tl.int64) * (8 * C) + c
    tl.store(out, m.to(tl.int32, bitcast=True))
    tl.store(out + C, arg)
    tl.store(out + 2 * C, tl.sum(bad.to(tl.int32), axis=0))
    tl.store(out + 3 * C, tl.sum(((x > float("-inf")) & ~bad).to(tl.int32), axis=0))
    tl.store(out + 4 * C, tl.min(tl.where(valid, key, 2147483647), axis=0))
    tl.store(out + 5 * C, tl.max(tl.where(valid, key, -2147483647 - 1), axis=0))
    tl.store(out + 6 * C, score.to(tl.int32, bitcast=True))
    tl.store(out + 7 * C, pick)


@triton.jit
def _sample_kernel(
    tok_ptr,  # [B] int64; written: the drawn token, -1 for a flagged row
    status_ptr,  # [B] int32; written: 0 ok, 1 NaN/+inf logit, 2 no finite logit
    logits_ptr,  # [B, V] fp16/bf16/fp32, strides (stride_b, stride_v)
    stride_b,
    stride_v,
    temp_ptr,  # [B] fp32 temperature (<= 0: greedy)
    topk_ptr,  # [B] int32 top-k (0: off)
    topp_ptr,  # [B] fp32 top-p (1.0: off)
    seed_ptr,  # [B] int64 Philox key per row
    offset_ptr,  # [B] int64 Philox offset per row
    scratch_x_ptr,  # [B, CAP] fp32 contiguous scratch: candidate values
    scratch_col_ptr,  # [B, CAP] int32 contiguous scratch: candidate columns
    part_ptr,  # [B, 8, C] int32 contiguous: pass 1's partials; read when SPLIT
    V,
    C,
    BLOCK: tl.constexpr,
    CAP: tl.constexpr,
    NP: tl.constexpr,
    MAX_PASSES: tl.constexpr,
    SPLIT: tl.constexpr,
    C_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_b
    sx_ptr = scratch_x_ptr + row.to(tl.int64) * CAP  # scratch rows: [B, CAP]
    sc_ptr = scratch_col_ptr + row.to(tl.int64) * CAP
    t = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)
    greedy = t <= 0.0
    div = tl.where(greedy, 1.0, t)  # divisor: HF scales by `scores / temperature`
    use_k = (~greedy) & (k > 0) & (k < V)
    use_p = (~greedy) & (p < 1.0)
    # pass 1 (the DRAM read): flags, max, argmax, key range; the draw for rows without filters
    filtered = use_k | use_p
    if SPLIT:
        # the chunks' partials from `_sample_split_kernel`, combined as `_scan` combines chunks
        cs = tl.arange(0, C_BLOCK)
        cm = cs < C
        part = part_ptr + row.to(tl.int64) * (8 * C) + cs
        m_c = tl.load(part, mask=cm, other=-8388608).to(tl.float32, bitcast=True)  # -inf's bits
        m = tl.max(m_c, axis=0)
        arg = tl.min(tl.where(cm & (m_c == m), tl.load(part + C, mask=cm, other=0), 2147483647), axis=0)
        n_bad = tl.sum(tl.load(part + 2 * C, mask=cm, other=0), axis=0)
        n_fin = tl.sum(tl.load(part + 3 * C, mask=cm, other=0), axis=0)
        kmin = tl.min(tl.load(part + 4 * C, mask=cm, other=2147483647), axis=0)
        kmax = tl.max(tl.load(part + 5 * C, mask=cm, other=-2147483647 - 1), axis=0)
        score = tl.load(part + 6 * C, mask=cm, other=-8388608).to(tl.float32, bitcast=True)
        best = tl.max(score, axis=0)
        win = tl.min(tl.where(cm & (score == best), cs, 2147483647), axis=0)
        pick = tl.max(tl.where(cs == win, tl.load(part + 7 * C, mask=cm, other=0), -1), axis=0)
    else:
        m, arg, n_bad, n_fin, kmin, kmax, pick = _scan(row_ptr, stride_v, V, div, -2147483647 - 1,
                                                       (~greedy) & (~filtered), seed, offset, BLOCK)
    ok_row = (n_bad == 0) & (n_fin > 0)
    token = tl.where(greedy, arg, pick).to(tl.int64)
    if ok_row & filtered:
        # The searches re-read the row (from L2) until at most CAP keys are >= lo; those move to
        # the row's scratch, and the rest of the search and the draw run on that short row.
        lo = kmin
        hi = kmax + 1
        c_lo = kmin * 0 + V  # (tensors, not Python numbers, so that every branch yields one type)
        f_lo = c_lo.to(tl.float32)
        n_cand = c_lo
        on_scratch = n_cand < 0
        if use_k:
            lo, hi, f_lo, c_lo, _z = _search(row_ptr, stride_v, V, div, m, lo, hi, lo, k, p, f_lo,
                                                     -1.0, CAP, False, BLOCK, NP, MAX_PASSES)
            if c_lo <= CAP:
                n_cand = _compact(row_ptr, stride_v, V, div, lo, sx_ptr, sc_ptr, BLOCK)
                on_scratch = n_cand >= 0
                lo, hi, f_lo, c_lo, _z = _search(sx_ptr, 1, n_cand, 1.0, m, lo, hi, lo, k, p, f_lo,
                                                         -1.0, 0, False, BLOCK, NP, MAX_PASSES)
        if use_p:
            # the top-p bracket starts at the top-k threshold: f(lo) = z = the mass of keys >= lo,
            # summed by the search's first pass (in the same order in both pass-1 variants)
            z = f_lo * 0.0 - 1.0
            hi = kmax + 1
            if on_scratch:
                lo, hi, f_lo, c_lo, z = _search(sx_ptr, 1, n_cand, 1.0, m, lo, hi, lo, k, p, z, z, 0,
                                                        True, BLOCK, NP, MAX_PASSES)
            else:
                base = lo
                lo, hi, f_lo, c_lo, z = _search(row_ptr, stride_v, V, div, m, lo, hi, base, k, p, z, z,
                                                        CAP, True, BLOCK, NP, MAX_PASSES)
                if c_lo <= CAP:
                    n_cand = _compact(row_ptr, stride_v, V, div, lo, sx_ptr, sc_ptr, BLOCK)
                    on_scratch = n_cand >= 0
                    lo, hi, f_lo, c_lo, z = _search(sx_ptr, 1, n_cand, 1.0, m, lo, hi, base, k, p,
                                                            f_lo, z, 0, True, BLOCK, NP, MAX_PASSES)
        if on_scratch:
            _m2, _a2, _b2, _f2, _n2, _x2, pos = _scan(sx_ptr, 1, n_cand, 1.0, lo, True, seed, offset, BLOCK)
            token = tl.load(sc_ptr + tl.maximum(pos, 0)).to(tl.int64)
        else:
            _m2, _a2, _b2, _f2, _n2, _x2, pick2 = _scan(row_ptr, stride_v, V, div, lo, True, seed, offset, BLOCK)
            token = pick2.to(tl.int64)
    status = tl.where(n_bad > 0, 1, tl.where(n_fin == 0, 2, 0))
    token = tl.where(status == 0, token, -1)
    tl.store(tok_ptr + row, token)
    tl.store(status_ptr + row, status.to(tl.int32))


def _outputs(B, device, out):
    if out is not None:
        return out
    return (torch.empty(B, dtype=torch.int64, device=device),
            torch.empty(B, dtype=torch.int32, device=device))


def _check_inputs(logits, temperature, top_k, top_p, seeds, offsets, out=None):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor [B, V], got {shape}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits dtype must be one of {_LOGIT_DTYPES}, got {logits.dtype}")
    B, V = logits.shape
    if B == 0 or V == 0:
        raise ValueError(f"logits must have B >= 1 and V >= 1, got shape {tuple(logits.shape)}")
    if V >= 2**24:
        raise ValueError(f"vocab size must be < 2**24 (counts are exact fp32), got {V}")
    expected = {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int32),
                "top_p": (top_p, torch.float32), "seeds": (seeds, torch.int64),
                "offsets": (offsets, torch.int64)}
    for name, (t, dtype) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape [B] = ({B},), got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}; "
                             "all inputs must share one device")
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be a (tokens, status) pair of tensors, got {type(out).__name__}")
        for name, t, dtype in (("out tokens", out[0], torch.int64), ("out status", out[1], torch.int32)):
            if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != (B,)
                    or t.stride(0) != 1 or t.device != logits.device):
                got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a contiguous [B] = ({B},) {dtype} tensor on "
                                 f"{logits.device}, got {got}")


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, offsets: torch.Tensor,
           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row with HF's temperature -> top-k -> top-p warpers (Triton; one launch,
    or two at batches <= 32: pass 1 split across ~V/1024 programs per row).

    Parameters
    ----------
    logits : torch.Tensor
        [B, V] fp32/fp16/bf16; any strides (a row stride > V is fine). Computed in fp32.
    temperature : torch.Tensor
        [B] fp32. A row with temperature <= 0 is greedy (argmax, lowest index on ties).
    top_k : torch.Tensor
        [B] int32. 0 (or >= V) switches top-k off; ties at the k-th value are kept.
    top_p : torch.Tensor
        [B] fp32 in (0, 1]; 1.0 switches top-p off; ties at the boundary are kept.
    seeds : torch.Tensor
        [B] int64 Philox key per row (see `row_seeds`).
    offsets : torch.Tensor
        [B] int64 step counter per row, read on the device (the runtime increments it between
        steps, so CUDA-graph replays draw fresh numbers).
    out : (tokens, status) or None
        Contiguous [B] int64 and [B] int32 tensors to write into (a CUDA graph's static outputs);
        None allocates them.

    Returns
    -------
    tokens : torch.Tensor
        [B] int64; -1 for flagged rows.
    status : torch.Tensor
        [B] int32: 0 ok, 1 the row has a NaN or +inf logit (after scaling), 2 no finite logit.

    Never syncs with the host, so it can be captured in a CUDA graph.

    Examples
    --------
    >>> logits = torch.randn(2, 50257, device="cuda")
    >>> t = torch.tensor([0.8, 0.0], device="cuda"); k = torch.tensor([50, 0], device="cuda", dtype=torch.int32)
    >>> p = torch.tensor([0.9, 1.0], device="cuda"); seeds = row_seeds(0, 2, "cuda")
    >>> tokens, status = sample(logits, t, k, p, seeds, torch.zeros(2, dtype=torch.int64, device="cuda"))
    """
    _check_inputs(logits, temperature, top_k, top_p, seeds, offsets, out)
    if not on_cuda(logits.device) and not interpreting():
        raise ValueError(f"sample (Triton) needs CUDA tensors, got {logits.device}; use sample_ref on the CPU "
                         "(or set TRITON_INTERPRET=1 before importing triton)")
    B, V = logits.shape
    params = [t.contiguous() for t in (temperature, top_k, top_p, seeds, offsets)]
    tokens, status = _outputs(B, logits.device, out)
    # per-row scratch for the <= _CAP candidates the searches narrow a row down to
    scratch_x = torch.empty(B, _CAP, dtype=torch.float32, device=logits.device)
    scratch_col = torch.empty(B, _CAP, dtype=torch.int32, device=logits.device)
    C = triton.cdiv(V, _BLOCK)
    split = B <= _SPLIT_MAX_BATCH and C >= _SPLIT_MIN_CHUNKS
    parts = tokens  # unused unless split
    if split:
        parts = torch.empty(B, _NUM_PARTS, C, dtype=torch.int32, device=logits.device)
        _sample_split_kernel[(B, C)](parts, logits, logits.stride(0), logits.stride(1), *params, V, C,
                                     BLOCK=_BLOCK, num_warps=_SPLIT_WARPS)
    _sample_kernel[(B,)](tokens, status, logits, logits.stride(0), logits.stride(1), *params, scratch_x,
                         scratch_col, parts, V, C,
                         BLOCK=_BLOCK, CAP=_CAP, NP=_NUM_PIVOTS, MAX_PASSES=_MAX_PASSES,
                         SPLIT=split, C_BLOCK=triton.next_power_of_2(C) if split else 1,
                         num_warps=_NUM_WARPS)
    return tokens, status


# ----------------------------------------------------------------------------------------------
# seeds and the reference's counter-based uniforms (splitmix64, vectorised in torch int64)

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser of int64 `x` (wrapping arithmetic), elementwise."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def row_seeds(seed: int, num_rows: int, device) -> torch.Tensor:
    """Independent per-row Philox keys derived from one call seed.

    Parameters
    ----------
    seed : int
        The call's seed (any Python int; taken modulo 2**64).
    num_rows : int
        How many rows (e.g. batch * num_return_sequences).
    device : str or torch.device

    Returns
    -------
    torch.Tensor
        [num_rows] int64: splitmix64(splitmix64(seed) + row * 0x9E3779B97F4A7C15), a bijection of
        the row for a given seed, so the rows of one call never share a Philox key.

    Examples
    --------
    >>> row_seeds(1234, 4, "cpu").shape
    torch.Size([4])
    """
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    base = _splitmix64(torch.tensor([_i64(seed)], dtype=torch.int64))
    rows = torch.arange(num_rows, dtype=torch.int64)
    return _splitmix64(base + rows * _GOLDEN).to(device)


def _ref_uniform(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp64 uniforms in [0, 1), one per row, from (seed, offset) on the inputs' device."""
    h = _splitmix64(_splitmix64(seeds) ^ offsets)
    return _shr(h, 11).to(torch.float64) * 2.0**-53


# ----------------------------------------------------------------------------------------------
# eager reference


def _filter_ref(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF's TopK then TopP warpers on fp32 scores [R, V] (per-row k, p), ties at the top-p boundary kept.

    Returns the filtered scores (removed entries -inf).
    """
    R, V = x.shape
    k = top_k.long()
    k = torch.where((k <= 0) | (k >= V), torch.full_like(k, V), k)
    on = k < V
    if bool(on.any()):
        kmax = int(k[on].max())
        idx = torch.where(on, k - 1, kmax - 1)[:, None]  # [R, 1]
        kth = torch.topk(x, kmax, dim=-1).values.gather(1, idx)  # the k-th largest score, [R, 1]
        x = x.masked_fill((x < kth) & on[:, None], float("-inf"))
    p = top_p.float()
    rows = p < 1.0
    if bool(rows.any()):
        xs = x[rows]
        sorted_x, sorted_idx = torch.sort(xs, descending=False, dim=-1)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - p[rows])[:, None]
        remove[:, -1] = False  # min_tokens_to_keep = 1
        # the smallest kept value; every token tied with it is kept too
        t = torch.where(remove, float("inf"), sorted_x).min(dim=-1, keepdim=True).values
        x = x.clone()
        x[rows] = xs.masked_fill(xs < t, float("-inf"))
    return x


def filter_logits_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """The scores a row is drawn from, as HF reports them with `output_scores`.

    Parameters
    ----------
    logits : [B, V] float tensor (processed logits).
    temperature, top_k, top_p : [B] tensors, as for `sample`.

    Returns
    -------
    [B, V] fp32 tensor: greedy rows (temperature <= 0) unchanged; sampled rows divided by their
    temperature, then top-k and top-p filtered (removed entries -inf), as HF's warpers do.
    """
    x = logits.float().clone()
    sampled = (temperature > 0).nonzero().flatten()
    if sampled.numel():
        xs = x[sampled] / temperature[sampled, None].float()
        x[sampled] = _filter_ref(xs, top_k[sampled], top_p[sampled])
    return x


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, offsets: torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `sample` (same signature): HF's warpers in torch, then an inverse-CDF draw.

    The uniform of each row is splitmix64(splitmix64(seed) ^ offset) (53 bits, on the inputs'
    device, no host sync), so a draw is reproducible from (seed, offset) but not the same number as
    the kernel's Philox stream. Greedy rows are argmax; flags as in `sample`.
    """
    _check_inputs(logits, temperature, top_k, top_p, seeds, offsets, out)
    B, V = logits.shape
    x = logits.float()
    tokens = torch.argmax(x, dim=-1)  # greedy rows' answer: lowest index among ties
    m = x.amax(dim=-1)  # NaN propagates, so m alone gives the flags
    sampled = (temperature > 0).nonzero().flatten()  # (a host sync; the reference is never captured)
    xs = x[sampled] / temperature[sampled, None]  # [R, V]
    m[sampled] = xs.amax(dim=-1)  # after scaling (a finite logit / small T may overflow)
    status = torch.where(torch.isnan(m) | (m == float("inf")), 1, torch.where(m == float("-inf"), 2, 0))
    status = status.to(torch.int32)
    ok = status[sampled] == 0
    rows, xs = sampled[ok], xs[ok]
    if rows.numel():
        xs = _filter_ref(xs, top_k[rows], top_p[rows])
        cdf = torch.cumsum(torch.softmax(xs, dim=-1), dim=-1, dtype=torch.float64)  # [R, V]
        u = _ref_uniform(seeds[rows], offsets[rows]) * cdf[:, -1]
        drawn = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_max(V - 1)
        tokens[rows] = drawn
    tokens = torch.where(status == 0, tokens, -1)
    if out is None:
        return tokens, status
    out[0].copy_(tokens)
    out[1].copy_(status)
    return out

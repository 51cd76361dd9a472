"""Tests of the attention ops: kv_cache_write (ops/kv_write.py), prefill_attention (ops/attn_prefill.py),
decode_attention and decode_attention_partials (ops/attn_decode.py).

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py) on small shapes in
fp32/fp16; `gpu` tests cover bf16 and real sizes. Every kernel result is compared with the eager
reference computed in fp32 on upcast inputs, and the reference itself with a dense softmax.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gptfast.bench.op_cases import attention as attention_cases
from gptfast.ops import attn_decode, attn_prefill, kv_write
from gptfast.ops.common import TOLERANCES, assert_close

# the interpreter (numpy >= 1.25) warns on every scalar it indexes with; it is Triton's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")



def paged_cache(lens, heads, head_dim, block_size, dtype, device, gen, spare_cols=1):
    """Random K/V caches holding sequences of `lens` tokens in shuffled (non-monotonic) pages.

    Every block, the null block 0 and unused spares included, holds random data, so a key read
    past seq_len or through a padding entry changes the result. Block tables get `spare_cols`
    padding columns of 0 beyond the longest sequence.
    """
    pages = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages) + 3  # null block + 2 never-referenced blocks
    shape = (num_blocks, block_size, heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(lens), max(pages, default=0) + spare_cols, dtype=torch.int32)
    used = 0
    for b, p in enumerate(pages):
        table[b, :p] = torch.tensor(perm[used : used + p], dtype=torch.int32)
        used += p
    return k_cache, v_cache, table.to(device)


def prefill_inputs(lens, q_lens, heads, head_dim, block_size, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = paged_cache(lens, heads, head_dim, block_size, dtype, device, gen)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype).to(device)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, cu, seq_lens


def decode_inputs(lens, heads, head_dim, block_size, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = paged_cache(lens, heads, head_dim, block_size, dtype, device, gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, seq_lens


def upcast(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check_against_ref(op, ref, args, dtype, name):
    out = op(*args)
    assert out.dtype == dtype
    expected = ref(*upcast(args))  # fp32 reference on the same (rounded) inputs
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert_close(out, expected, **TOLERANCES[dtype], name=name)


# --------------------------------------------------------------------------------------------
# kv_cache_write
# --------------------------------------------------------------------------------------------

WRITE_CASES = {
    # id: (N, H, D, block_size, num_blocks)
    "n1-h1-d16-bs16": (1, 1, 16, 16, 2),
    "n13-h3-d80-bs7": (13, 3, 80, 7, 4),
    "n40-h5-d64-bs1": (40, 5, 64, 1, 50),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES + [torch.bfloat16], ids=dtype_id)  # no tl.dot: bf16 interprets
@pytest.mark.parametrize("case", WRITE_CASES.values(), ids=WRITE_CASES.keys())
def test_kv_cache_write(case, dtype):
    N, H, D, bs, num_blocks = case
    gen = torch.Generator().manual_seed(N * 1000 + D)
    # k and v as strided views of a fused projection output [N, 3, H, D], like the model's
    qkv = torch.randn(N, 3, H, D, generator=gen).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * bs, generator=gen)[:N]
    slots[1::3] = -1  # skipped tokens
    k_cache = torch.randn(num_blocks, bs, H, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, H, D, generator=gen).to(dtype)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    before_k = k_cache.clone()

    kv_write.kv_cache_write(k, v, k_cache, v_cache, slots)
    kv_write.kv_cache_write_ref(k, v, kc_ref, vc_ref, slots)

    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)
    # the reference itself: written rows hold k/v, every other row is untouched
    flat_k = kc_ref.view(-1, H, D)
    flat_v = vc_ref.view(-1, H, D)
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[n]) and torch.equal(flat_v[s], v[n])
            written[s] = True
    assert int(written.sum()) == int((slots >= 0).sum()) > 0
    assert torch.equal(flat_k[~written], before_k.view(-1, H, D)[~written])


def test_kv_cache_write_rejects_bad_inputs():
    k = torch.randn(4, 2, 16)
    cache = torch.randn(3, 4, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write.kv_cache_write(k, k, cache, cache.clone(), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache"):
        kv_write.kv_cache_write(k, k, torch.randn(3, 4, 3, 16), cache, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        kv_write.kv_cache_write(k, k, cache.transpose(0, 1), cache, torch.zeros(4, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# the references against dense attention on contiguous tensors
# --------------------------------------------------------------------------------------------


def dense_causal(q, k, v, scale):
    """q, k, v [T, H, D] fp64: plain causal softmax attention."""
    T = q.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)


def test_references_match_dense_attention():
    H, D, bs = 3, 16, 5
    lens, q_lens = [1, 12, 23], [1, 12, 9]  # the last sequence has a 14-token cached prefix
    q_full = [torch.randn(n, H, D, dtype=torch.float64) for n in lens]
    k_full = [torch.randn(n, H, D, dtype=torch.float64) for n in lens]
    v_full = [torch.randn(n, H, D, dtype=torch.float64) for n in lens]
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, table = paged_cache(lens, H, D, bs, torch.float64, "cpu", gen)
    for b, n in enumerate(lens):  # write each sequence through its (shuffled) block table
        slots = table[b, (torch.arange(n) // bs)].long() * bs + torch.arange(n) % bs
        kv_write.kv_cache_write_ref(k_full[b], v_full[b], k_cache, v_cache, slots)
    q = torch.cat([qf[n - m :] for qf, n, m in zip(q_full, lens, q_lens)])
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 0.3

    out = attn_prefill.prefill_attention_ref(q, k_cache, v_cache, table, cu, seq_lens, scale, max(q_lens))
    expected = torch.cat(
        [dense_causal(qf, kf, vf, scale)[n - m :] for qf, kf, vf, n, m in zip(q_full, k_full, v_full, lens, q_lens)]
    )
    assert_close(out, expected, **TOLERANCES[torch.float32], name="prefill_attention_ref")

    # decode: the last token of each sequence attends to the whole sequence
    q_last = torch.stack([qf[-1] for qf in q_full])  # [B, H, D]
    out = attn_decode.decode_attention_ref(q_last, k_cache, v_cache, table, seq_lens, scale)
    expected = torch.stack([dense_causal(qf, kf, vf, scale)[-1] for qf, kf, vf in zip(q_full, k_full, v_full)])
    assert_close(out, expected, **TOLERANCES[torch.float32], name="decode_attention_ref")


# --------------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------------

PREFILL_CASES = {
    # id: (seq_lens, q_lens, H, D, block_size, scale multiplier)
    "b1-len1-h1-d16-bs16": ([1], [1], 1, 16, 16, 1.0),
    "b3-len5,63,97-h3-d32-bs16": ([5, 63, 97], [5, 63, 97], 3, 32, 16, 1.0),
    "b3-prefix-h2-d64-bs7": ([97, 40, 7], [30, 1, 7], 2, 64, 7, 0.25),  # 1/(layer_idx+1) scaling
    "b4-empty-seq-h1-d16-bs32": ([33, 5, 64, 2], [33, 0, 20, 2], 1, 16, 32, 1.0),
    "b17-short-h1-d16-bs1": ([1 + (i * 5) % 9 for i in range(17)], [1 + (i * 5) % 9 for i in range(17)], 1, 16, 1, 1.0),
    "b2-h5-d80-bs32-sharp": ([63, 20], [63, 11], 5, 80, 32, 8.0),  # peaked softmax
    "b1-len300-prefix-h1-d64-bs16": ([300], [170], 1, 64, 16, 1.0),  # > BLOCK_M query rows
}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
def test_prefill_attention(case, dtype, poison_empty):
    lens, q_lens, H, D, bs, mult = case
    args = prefill_inputs(lens, q_lens, H, D, bs, dtype, "cpu", seed=sum(lens) + D)
    args = (*args, mult / math.sqrt(D), max(q_lens))
    check_against_ref(attn_prefill.prefill_attention, attn_prefill.prefill_attention_ref, args, dtype,
                      "prefill_attention")


def random_case(seed: int):
    """A random ragged batch: 1..5 sequences of 1..150 keys, random prefixes, head count, head
    size and block size (powers of 2 or not)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    B = int(torch.randint(1, 6, (1,), generator=g))
    lens = torch.randint(1, 151, (B,), generator=g).tolist()
    q_lens = [int(torch.randint(1, n + 1, (1,), generator=g)) for n in lens]
    return lens, q_lens, pick([1, 2, 3, 4]), pick([16, 32, 64, 80]), pick([1, 3, 16, 32])


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_prefill_attention_random(seed, poison_empty):
    lens, q_lens, H, D, bs = random_case(seed)
    dtype = CPU_DTYPES[seed % 2]
    args = (*prefill_inputs(lens, q_lens, H, D, bs, dtype, "cpu", seed=seed), D**-0.5, max(q_lens))
    name = f"prefill {lens} {q_lens} H={H} D={D} bs={bs}"
    check_against_ref(attn_prefill.prefill_attention, attn_prefill.prefill_attention_ref, args, dtype, name)


def test_prefill_attention_strided_q():
    # q as a view of a fused projection [N, 3, H, D]: strided rows, contiguous last dim
    lens = [9, 30]
    q, k_cache, v_cache, table, cu, seq_lens = prefill_inputs(lens, lens, 2, 32, 8, torch.float32, "cpu", seed=3)
    qkv = torch.randn(q.shape[0], 3, 2, 32)
    qkv[:, 0] = q
    args = (qkv[:, 0], k_cache, v_cache, table, cu, seq_lens, 0.2, max(lens))
    assert_close(attn_prefill.prefill_attention(*args), attn_prefill.prefill_attention_ref(q, *args[1:]),
                 **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_write_prefill_then_decode_agree(dtype):
    # the runtime's sequence of calls, all through the kernels: write a 45-token prompt's K/V and
    # prefill it; then each of the last 4 positions, decoded alone, must equal its prefill row
    H, D, bs, T = 3, 32, 8, 45
    gen = torch.Generator().manual_seed(17)
    k_cache, v_cache, table = paged_cache([T], H, D, bs, dtype, "cpu", gen)
    q, k, v = (torch.randn(T, H, D, generator=gen).to(dtype) for _ in range(3))
    pos = torch.arange(T)
    slots = table[0, pos // bs].long() * bs + pos % bs
    kv_write.kv_cache_write(k, v, k_cache, v_cache, slots)
    cu = torch.tensor([0, T], dtype=torch.int32)
    prefill = attn_prefill.prefill_attention(q, k_cache, v_cache, table, cu, torch.tensor([T], dtype=torch.int32),
                                             0.2, T)
    for p in range(T - 4, T):
        lens = torch.tensor([p + 1], dtype=torch.int32)
        decode = attn_decode.decode_attention(q[p : p + 1], k_cache, v_cache, table, lens, 0.2)
        assert_close(decode[0], prefill[p], **TOLERANCES[dtype], name=f"position {p}")


def test_prefill_attention_rejects_bad_inputs():
    q, k_cache, v_cache, table, cu, seq_lens = prefill_inputs([5], [5], 2, 16, 4, torch.float32, "cpu", seed=1)
    good = (q, k_cache, v_cache, table, cu, seq_lens, 0.25, 5)
    bad = {
        "dtype": (q.double(), *good[1:]),
        "seq_lens": (*good[:5], seq_lens.long(), *good[6:]),
        "cu_seqlens_q": (*good[:4], cu[:1], *good[5:]),
        "block_tables": (*good[:3], table.long(), *good[4:]),
        "max_seqlen_q": (*good[:7], 5.0),
        "scale": (*good[:6], float("nan"), 5),
        "head_dim": (torch.randn(5, 2, 300), *good[1:]),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            attn_prefill.prefill_attention(*args)


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------

DECODE_CASES = {
    # id: (seq_lens, H, D, block_size)
    "b1-len1-h1-d16-bs16": ([1], 1, 16, 16),
    "b3-len5,63,97-h3-d32-bs16": ([5, 63, 97], 3, 32, 16),
    "b17-len0..16-h1-d16-bs1": ([(i * 7) % 17 for i in range(17)], 1, 16, 1),  # includes seq_len 0
    "b2-h5-d80-bs7": ([63, 20], 5, 80, 7),
    "b3-len300,1,0-h2-d64-bs32": ([300, 1, 0], 2, 64, 32),
}


@pytest.mark.parametrize("sm_count", [1, 4, 64], ids=lambda n: f"sms{n}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_attention(case, dtype, sm_count, poison_empty, monkeypatch):
    # the SM count the interpreter assumes picks the split-KV factor: 1, a few, many
    monkeypatch.setattr(attn_decode, "_INTERPRETER_SM_COUNT", sm_count)
    lens, H, D, bs = case
    args = (*decode_inputs(lens, H, D, bs, dtype, "cpu", seed=sum(lens) + D + sm_count), D**-0.5)
    check_against_ref(attn_decode.decode_attention, attn_decode.decode_attention_ref, args, dtype, "decode_attention")


def test_decode_attention_bf16_interpreted(poison_empty):
    # decode has no tl.dot, so unlike prefill its bf16 path runs in the interpreter too
    args = (*decode_inputs([5, 63, 97, 0], 3, 32, 7, torch.bfloat16, "cpu", seed=8), 32**-0.5)
    check_against_ref(attn_decode.decode_attention, attn_decode.decode_attention_ref, args, torch.bfloat16,
                      "decode_attention")


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_decode_attention_random(seed, poison_empty, monkeypatch):
    monkeypatch.setattr(attn_decode, "_INTERPRETER_SM_COUNT", 1 + 7 * seed)
    lens, _, H, D, bs = random_case(100 + seed)
    lens[seed % len(lens)] = 0  # a graph-padding row
    dtype = CPU_DTYPES[seed % 2]
    args = (*decode_inputs(lens, H, D, bs, dtype, "cpu", seed=seed), D**-0.5)
    check_against_ref(attn_decode.decode_attention, attn_decode.decode_attention_ref, args, dtype,
                      f"decode {lens} H={H} D={D} bs={bs}")


def test_decode_split_kv_is_exercised():
    # "b3-len300,1,0-h2-d64-bs32" above: 11 table columns of 32 keys = 6 tiles of 64 at most, so
    # sms 1/4/64 run it unsplit, with 3 splits and with 6 (the 300-key row leaves one empty)
    block_n = attn_decode._decode_block_n(64)
    assert [attn_decode._decode_num_splits(3, 2, 11 * 32, block_n, sms) for sms in (1, 4, 64)] == [1, 3, 6]
    # H100-like: batch 1 of GPT-2 spreads over the SMs, a big batch runs in one launch
    assert attn_decode._decode_num_splits(1, 12, 4096, 64, 132) == 44
    assert attn_decode._decode_num_splits(8, 12, 1024, 64, 132) == 6
    assert attn_decode._decode_num_splits(64, 12, 1024, 64, 132) == 1


def test_decode_attention_all_rows_empty(poison_empty):
    # a CUDA-graph bucket padded with seq_len-0 rows: zeros, never NaN, no key read
    q, k_cache, v_cache, table, seq_lens = decode_inputs([0, 0, 0], 2, 16, 4, torch.float32, "cpu", seed=5)
    expected = attn_decode.decode_attention_ref(q, k_cache, v_cache, table, seq_lens, 0.25)
    assert torch.equal(expected, torch.zeros_like(expected))
    k_cache.fill_(float("nan"))  # a read of any key would poison the kernel's output
    v_cache.fill_(float("nan"))
    out = attn_decode.decode_attention(q, k_cache, v_cache, table, seq_lens, 0.25)
    assert torch.equal(out, expected)


def test_decode_attention_rejects_bad_inputs():
    q, k_cache, v_cache, table, seq_lens = decode_inputs([3, 4], 2, 16, 4, torch.float32, "cpu", seed=2)
    good = (q, k_cache, v_cache, table, seq_lens, 0.25)
    bad = {
        "v_cache dtype": (q, k_cache, v_cache.half(), table, seq_lens, 0.25),
        "seq_lens": (q, k_cache, v_cache, table, seq_lens[:1], 0.25),
        "block_tables": (q, k_cache, v_cache, table[:1], seq_lens, 0.25),
        "last dimension": (q.transpose(1, 2).contiguous().transpose(1, 2), *good[1:]),
        "H=2": (q, k_cache[:, :, :1], v_cache, table, seq_lens, 0.25),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            attn_decode.decode_attention(*args)


def test_benchmark_cases_cpu():
    cases = attention_cases.benchmark_cases("cpu", quick=True)
    assert {c.op for c in cases} == {"prefill_attention", "decode_attention", "kv_cache_write",
                                     "decode_attention_partials"}
    for case in [c for c in cases if c.op == "kv_cache_write"]:
        # in place: the launcher and the reference must leave identical caches
        args_fast = case.make_args()
        args_ref = tuple(a.clone() for a in args_fast)
        assert kv_write.kv_cache_write(*args_fast) is None and kv_write.kv_cache_write_ref(*args_ref) is None
        for got, want in zip(args_fast[2:4], args_ref[2:4]):
            assert_close(got, want, atol=0, rtol=0, name=case.label)
    appends = [c for c in cases if c.params.get("append")]
    assert sorted(c.params["qkv_bias"] for c in appends) == [False, True]
    for case in appends:
        # the fused op against the unfused step it replaces (separate write + decode; or the bias
        # added by its own kernel, then the append): same output, same caches
        args_base = case.make_args()  # the baseline's own: it finds their projection from q
        q, k_new = args_base[0], args_base[6]
        assert q.stride(0) == k_new.stride(0) == 3 * q.shape[1] * q.shape[2]  # views of one [B, 3, H, D]
        assert len(args_base) == (10 if case.params["qkv_bias"] else 9)
        args_fast, args_ref = (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args_base)
                               for _ in range(2))
        kc_before = args_fast[1].clone()
        out = attn_decode.decode_attention(*args_fast)
        expected = attn_decode.decode_attention_ref(*args_ref)
        (base_name, base_fn), = case.baselines.items()
        baseline = base_fn(*args_base)
        assert_close(out, expected, atol=case.atol, rtol=case.rtol, name=case.label)
        assert_close(baseline, expected, atol=case.atol, rtol=case.rtol, name=f"{base_name} {case.label}")
        assert not torch.equal(args_fast[1], kc_before)  # the new K was written ...
        for i in (1, 2):  # ... exactly where the unfused step writes it
            assert torch.equal(args_fast[i], args_ref[i]) and torch.equal(args_fast[i], args_base[i])
    for case in [c for c in cases if c.op == "decode_attention_partials"]:
        # the partials against their reference; merged, they are the baseline's (split + merge) output
        from gptfast.ops.proj_residual import merge_partials_ref

        args = case.make_args()
        copies = [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for _ in range(2)]
        fast = attn_decode.decode_attention_partials(*copies[0])
        ref = attn_decode.decode_attention_partials_ref(*copies[1])
        for got, want in zip(fast, ref):
            assert_close(got, want, atol=case.atol, rtol=case.rtol, name=case.label)
        (base_name, base_fn), = case.baselines.items()
        assert_close(merge_partials_ref(*fast), base_fn(*args), atol=case.atol, rtol=case.rtol, name=base_name)
    for case in [c for c in cases if c.op not in ("kv_cache_write", "decode_attention_partials") and c not in appends]:
        args = case.make_args()
        fast, ref = getattr(attention_cases, case.op), getattr(attention_cases, case.op + "_ref")
        expected = ref(*args)
        assert_close(fast(*args), expected, atol=case.atol, rtol=case.rtol, name=case.label)
        # the SDPA baseline computes the same function on its contiguous copies ...
        sdpa = case.baselines["sdpa"]
        assert_close(sdpa(*args), expected, atol=case.atol, rtol=case.rtol, name="sdpa " + case.label)
        # ... which die with the args (the runner rotates many argument sets)
        assert len(sdpa.inputs._by_q) == 1
        del args
        assert len(sdpa.inputs._by_q) == 0


# --------------------------------------------------------------------------------------------
# decode with the K/V append fused
# --------------------------------------------------------------------------------------------


def append_inputs(lens, heads, head_dim, block_size, dtype, device, seed, skip=(), pad_slot=True, poison=True):
    """Decode inputs whose new token (position seq_len - 1) the op appends.

    q, k_new, v_new are strided views of one [B, 3, H, D] projection output (the model's layout).
    slot_mapping: the new position's slot, -1 for the rows in `skip`; padding rows (seq_len 0)
    get a valid slot in a never-referenced block when `pad_slot` (the op must still not write it),
    else -1. With `poison`, the new positions' slots are NaN in both caches: a program reading a
    new key from the cache instead of k_new shows up (a row in `skip` keeps its NaN). (Only the
    new positions: the reference turns a NaN key under its mask into a NaN output.)
    Returns (args, pad_slots).
    """
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = paged_cache(lens, heads, head_dim, block_size, dtype, "cpu", gen)
    B = len(lens)
    qkv = torch.randn(B, 3, heads, head_dim, generator=gen).to(dtype)  # [B, 3, H, D]
    unused = sorted(set(range(1, k_cache.shape[0])) - set(table.flatten().tolist()))
    slots, pad_slots = [], []
    for b, n in enumerate(lens):
        if n == 0:
            s = unused[0] * block_size + b % block_size if pad_slot else -1
            pad_slots += [s] if s >= 0 else []
        else:
            s = int(table[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
            if poison:
                k_cache.view(-1, heads, head_dim)[s] = float("nan")
                v_cache.view(-1, heads, head_dim)[s] = float("nan")
        slots.append(-1 if b in skip else s)
    qkv, k_cache, v_cache, table = (t.to(device) for t in (qkv, k_cache, v_cache, table))
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    args = (qkv[:, 0], k_cache, v_cache, table, seq_lens, head_dim**-0.5, qkv[:, 1], qkv[:, 2], slot_mapping)
    return args, pad_slots


def copy_args(args, dtype=None):
    """Independent copies of the tensor args (views become contiguous), floats cast to `dtype` if given."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.clone()
            if dtype is not None and a.is_floating_point():
                a = a.to(dtype)
        out.append(a)
    return tuple(out)


def run_append(args, qkv_bias=None):
    q, k_cache, v_cache, table, seq_lens, scale, k_new, v_new, slots = args
    return attn_decode.decode_attention(q, k_cache, v_cache, table, seq_lens, scale, k_new=k_new, v_new=v_new,
                              slot_mapping=slots, qkv_bias=qkv_bias)


def check_append(args, dtype, name, pad_slots=(), run=None, qkv_bias=None):
    """The fused op (`run(args)`, default `run_append(args, qkv_bias)`) against the fp32
    reference (output) and against kv_cache_write_ref (caches, every element, exactly): the new
    K/V land in their slots and nothing else changes. With `qkv_bias` [3, H, D] the expected
    new K/V are computed here, independently of the reference: `k_new + bias[1]` in fp32,
    rounded to the cache dtype."""
    q, k_cache, v_cache, _, seq_lens, _, k_new, v_new, slots = args
    bias32 = None if qkv_bias is None else qkv_bias.float()
    expected = attn_decode.decode_attention_ref(*copy_args(args, torch.float32), qkv_bias=bias32)
    cache_tol = dict(atol=0, rtol=0)
    if qkv_bias is not None:
        k_new = (k_new.float() + bias32[1]).to(dtype)
        v_new = (v_new.float() + bias32[2]).to(dtype)
        if dtype == torch.bfloat16 and q.device.type == "cpu":
            # COMPAT(triton 3.6) the interpreter casts fp32 -> bf16 by truncation, a GPU (and torch) to nearest even
            cache_tol = dict(atol=0, rtol=2**-7)
    H, D = q.shape[1], q.shape[2]
    kc_want, vc_want = k_cache.clone(), v_cache.clone()
    kc_before = k_cache.clone()
    kv_write.kv_cache_write_ref(k_new, v_new, kc_want, vc_want, torch.where(seq_lens > 0, slots, -1))
    out = run(args) if run is not None else run_append(args, qkv_bias)
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), f"{name}: NaN in output (a new key read from its poisoned slot?)"
    assert_close(out, expected, **TOLERANCES[dtype], name=name)
    assert_close(k_cache, kc_want, **cache_tol, name=f"{name}: k_cache")  # NaN == NaN: skipped slots
    assert_close(v_cache, vc_want, **cache_tol, name=f"{name}: v_cache")
    flat_k, flat_before = k_cache.view(-1, H, D), kc_before.view(-1, H, D)
    for b, s in enumerate(slots.tolist()):  # the expectation itself is not vacuous
        if s >= 0 and int(seq_lens[b]) > 0:
            assert_close(flat_k[s], k_new[b], **cache_tol, name=f"{name}: row {b}'s K in slot {s}")
    for s in pad_slots:
        assert torch.equal(flat_k[s], flat_before[s]), f"{name}: padding row wrote slot {s}"


APPEND_CASES = {
    # id: (seq_lens, H, D, block_size, rows with slot -1)
    "b1-len1-h1-d16-bs16": ([1], 1, 16, 16, ()),  # the new token is the only key
    "b4-block-edges-h2-d32-bs8": ([8, 9, 16, 13], 2, 32, 8, ()),  # last of a block, first, inside
    "b5-pad-skip-h3-d16-bs4": ([0, 13, 0, 64, 5], 3, 16, 4, (4,)),  # padding rows, an uncached token
    "b3-len300,65,1-h2-d64-bs32": ([300, 65, 1], 2, 64, 32, (1,)),  # 65: new key alone in its tile
    "b2-h5-d80-bs7": ([63, 22], 5, 80, 7, ()),
}


@pytest.mark.parametrize("sm_count", [1, 4, 64], ids=lambda n: f"sms{n}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", APPEND_CASES.values(), ids=APPEND_CASES.keys())
def test_decode_attention_append(case, dtype, sm_count, poison_empty, monkeypatch):
    monkeypatch.setattr(attn_decode, "_INTERPRETER_SM_COUNT", sm_count)
    lens, H, D, bs, skip = case
    args, pad_slots = append_inputs(lens, H, D, bs, dtype, "cpu", seed=sum(lens) + D + sm_count, skip=skip)
    check_append(args, dtype, f"append {lens} sms={sm_count}", pad_slots)


def test_decode_append_splits_are_exercised():
    # "b3-len300,65,1" above with sms 4 and 64: 3 and 6 splits, and the new key of the 300-key row
    # (position 299) and of the 65-key row (64) belong to a later split than the first
    block_n = attn_decode._decode_block_n(64)
    for sms, splits in ((4, 3), (64, 6)):
        assert attn_decode._decode_num_splits(3, 2, 11 * 32, block_n, sms) == splits
        for n in (300, 65):
            keys_per_split = math.ceil(math.ceil(n / block_n) / splits) * block_n
            assert (n - 1) // keys_per_split > 0


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_decode_attention_append_random(seed, poison_empty, monkeypatch):
    # random ragged batches; the fused op also agrees with the unfused kernels (write, then decode)
    monkeypatch.setattr(attn_decode, "_INTERPRETER_SM_COUNT", 1 + 7 * seed)
    lens, _, H, D, bs = random_case(200 + seed)
    lens[seed % len(lens)] = 0
    dtype = CPU_DTYPES[seed % 2]
    skip = (1,) if seed % 2 else ()
    args, pad_slots = append_inputs(lens, H, D, bs, dtype, "cpu", seed=seed, skip=skip, pad_slot=seed < 2)
    unfused = copy_args(args)
    name = f"append {lens} H={H} D={D} bs={bs}"
    check_append(args, dtype, name, pad_slots)
    q, k_cache, v_cache, table, seq_lens, scale, k_new, v_new, slots = unfused
    if not skip:
        kv_write.kv_cache_write(k_new, v_new, k_cache, v_cache, torch.where(seq_lens > 0, slots, -1))
        out = attn_decode.decode_attention(q, k_cache, v_cache, table, seq_lens, scale)
        assert_close(run_append(args), out, **TOLERANCES[dtype], name=f"{name} vs unfused")
        assert torch.equal(k_cache, args[1]) and torch.equal(v_cache, args[2])


def test_decode_attention_append_bf16_interpreted(poison_empty):
    args, pad_slots = append_inputs([5, 0, 63, 97], 3, 32, 7, torch.bfloat16, "cpu", seed=8, skip=(2,))
    check_append(args, torch.bfloat16, "append bf16", pad_slots)


def test_decode_attention_append_contiguous_inputs(poison_empty):
    # k_new/v_new/q need not be views: separate contiguous tensors work too
    args, _ = append_inputs([30, 7], 2, 16, 8, torch.float32, "cpu", seed=4)
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    check_append(args, torch.float32, "append contiguous")


def test_decode_attention_append_all_rows_empty(poison_empty):
    # a bucket of padding rows only: zeros, no key read, nothing written (valid slots given)
    args, pad_slots = append_inputs([0, 0, 0], 2, 16, 4, torch.float32, "cpu", seed=5)
    assert len(pad_slots) == 3
    k_cache, v_cache = args[1:3]
    k_cache[1:].fill_(float("nan"))  # all but the null block (where the tables point): any read shows
    v_cache[1:].fill_(float("nan"))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = run_append(args)
    assert torch.equal(out, torch.zeros_like(out))
    assert_close(k_cache, k_before, atol=0, rtol=0, name="k_cache")  # NaN == NaN here
    assert_close(v_cache, v_before, atol=0, rtol=0, name="v_cache")


def test_decode_append_reference_is_write_then_decode():
    # the reference's semantics: for rows whose slot is the new position's, the two-step
    # write-then-attend; a skipped slot (-1) still attends to k_new, as if it had been written
    lens, H, D, bs = [20, 0, 9, 33], 2, 16, 8
    args, _ = append_inputs(lens, H, D, bs, torch.float64, "cpu", seed=12, skip=(2,))
    q, k_cache, v_cache, table, seq_lens, scale, k_new, v_new, slots = copy_args(args)
    fused = attn_decode.decode_attention_ref(*args)
    proper = slots.clone()
    proper[2] = int(table[2, (9 - 1) // bs]) * bs + (9 - 1) % bs
    proper[1] = -1
    kv_write.kv_cache_write_ref(k_new, v_new, k_cache, v_cache, proper)
    assert_close(fused, attn_decode.decode_attention_ref(q, k_cache, v_cache, table, seq_lens, scale), atol=1e-12,
                 rtol=1e-12, name="append ref vs write-then-decode")
    assert not torch.isnan(fused).any() and torch.equal(fused[1], torch.zeros_like(fused[1]))
    # and the caches: row 2's slot kept its NaN (not written), the padding row's slot is untouched
    assert torch.isnan(args[1].view(-1, H, D)[proper[2]]).all()
    assert torch.equal(args[1].view(-1, H, D)[slots[1]], k_cache.view(-1, H, D)[slots[1]])


def test_decode_attention_strided_q(poison_empty):
    # without the append: q as a view of [B, 3, H, D] (the model then needs no q.contiguous())
    q, k_cache, v_cache, table, seq_lens = decode_inputs([9, 40, 0], 2, 32, 8, torch.float32, "cpu", seed=3)
    qkv = torch.randn(3, 3, 2, 32)
    qkv[:, 0] = q
    out = attn_decode.decode_attention(qkv[:, 0], k_cache, v_cache, table, seq_lens, 0.2)
    assert_close(out, attn_decode.decode_attention_ref(q, k_cache, v_cache, table, seq_lens, 0.2),
                 **TOLERANCES[torch.float32])


def test_decode_attention_append_rejects_bad_inputs():
    args, _ = append_inputs([3, 4], 2, 16, 4, torch.float32, "cpu", seed=2)
    base, (k_new, v_new, slots) = args[:6], args[6:]
    bad = {
        "go together": dict(k_new=k_new, v_new=v_new),
        "k_new must match": dict(k_new=k_new[:1], v_new=v_new, slot_mapping=slots),
        "v_new must match": dict(k_new=k_new, v_new=v_new.double(), slot_mapping=slots),
        "contiguous last": dict(k_new=k_new, v_new=v_new.transpose(1, 2).contiguous().transpose(1, 2),
                                slot_mapping=slots),
        "slot_mapping must be": dict(k_new=k_new, v_new=v_new, slot_mapping=slots.int()),
    }
    for what, kwargs in bad.items():
        for fn in (attn_decode.decode_attention, attn_decode.decode_attention_ref):
            with pytest.raises(ValueError, match=what):
                fn(*base, **kwargs)


# --------------------------------------------------------------------------------------------
# decode with the K/V append and the QKV projection's bias fused
# --------------------------------------------------------------------------------------------


def random_qkv_bias(args, seed):
    """A random bias [3, H, D] for the q/k_new/v_new of `args`, on their scale (so it matters)."""
    q = args[0]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, q.shape[1], q.shape[2], generator=gen).to(q.dtype).to(q.device)


@pytest.mark.parametrize("sm_count", [1, 4, 64], ids=lambda n: f"sms{n}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", APPEND_CASES.values(), ids=APPEND_CASES.keys())
def test_decode_attention_append_bias(case, dtype, sm_count, poison_empty, monkeypatch):
    # every split program adds q's bias; the new key's owner adds K's and V's, stores and attends
    # to the rounded sums (caches checked element by element); padding rows and slot -1 as before
    monkeypatch.setattr(attn_decode, "_INTERPRETER_SM_COUNT", sm_count)
    lens, H, D, bs, skip = case
    seed = sum(lens) + D + sm_count
    args, pad_slots = append_inputs(lens, H, D, bs, dtype, "cpu", seed=seed, skip=skip)
    bias = random_qkv_bias(args, seed)
    check_append(args, dtype, f"append+bias {lens} sms={sm_count}", pad_slots, qkv_bias=bias)


def test_decode_attention_append_bias_bf16_interpreted(poison_empty):
    args, pad_slots = append_inputs([5, 0, 63, 97], 3, 32, 7, torch.bfloat16, "cpu", seed=8, skip=(2,))
    check_append(args, torch.bfloat16, "append+bias bf16", pad_slots, qkv_bias=random_qkv_bias(args, 8))


def check_bias_is_linear_with_bias(lens, H, D, bs, dtype, device, seed):
    """The model's decode step with the bias fused (a bias-free F.linear, then the op with
    `qkv_bias`) against the eager step in fp32: F.linear with the bias, kv_cache_write_ref (rows
    with seq_len 0 write nothing), decode_attention_ref. Also the op's reference, on the same
    inputs, against the same eager step."""
    args, pad_slots = append_inputs(lens, H, D, bs, dtype, device, seed=seed)
    _, k_cache, v_cache, table, seq_lens, scale, _, _, slots = args
    B, C = len(lens), H * D
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=gen).to(dtype).to(device)
    weight = (torch.randn(3 * C, C, generator=gen) / math.sqrt(C)).to(dtype).to(device)
    bias = torch.randn(3 * C, generator=gen).to(dtype).to(device)

    qkv32 = F.linear(x.float(), weight.float(), bias.float()).view(B, 3, H, D)  # (B, 3, nh, hs)
    kc32, vc32 = k_cache.float(), v_cache.float()
    kv_write.kv_cache_write_ref(qkv32[:, 1], qkv32[:, 2], kc32, vc32, torch.where(seq_lens > 0, slots, -1))
    expected = attn_decode.decode_attention_ref(qkv32[:, 0], kc32, vc32, table, seq_lens, scale)

    caches_ref = (k_cache.clone(), v_cache.clone())
    kc_before = k_cache.clone()
    qkv = F.linear(x, weight).view(B, 3, H, D)  # the bias-free projection: q, k, v strided views
    q, k, v = qkv.unbind(1)
    out = attn_decode.decode_attention(q, k_cache, v_cache, table, seq_lens, scale, k, v, slots, bias.view(3, H, D))
    ref = attn_decode.decode_attention_ref(q, *caches_ref, table, seq_lens, scale, k, v, slots, bias.view(3, H, D))
    name = f"bias fused vs F.linear with bias {lens} {dtype_id(dtype)}"
    for got, what in ((out, "kernel"), (ref, "reference")):
        assert got.dtype == dtype
        assert_close(got, expected, **TOLERANCES[dtype], name=f"{name}: {what}")
    for got, want, what in ((k_cache, kc32, "k_cache"), (v_cache, vc32, "v_cache"),
                            (caches_ref[0], kc32, "reference k_cache"), (caches_ref[1], vc32, "reference v_cache")):
        assert_close(got, want, **TOLERANCES[dtype], name=f"{name}: {what}")  # NaN == NaN: none left
    for s in pad_slots:
        assert torch.equal(k_cache.view(-1, H, D)[s], kc_before.view(-1, H, D)[s]), f"padding row wrote slot {s}"


@pytest.mark.parametrize("sm_count", [1, 64], ids=lambda n: f"sms{n}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_decode_attention_bias_is_linear_with_bias(dtype, sm_count, poison_empty, monkeypatch):
    monkeypatch.setattr(attn_decode, "_INTERPRETER_SM_COUNT", sm_count)
    check_bias_is_linear_with_bias([37, 0, 1, 70, 0], 3, 32, 8, dtype, "cpu", seed=sm_count)


def test_decode_attention_bias_rejects_bad_inputs():
    args, _ = append_inputs([3, 4], 2, 16, 4, torch.float32, "cpu", seed=2)
    bias = random_qkv_bias(args, 2)
    bad = {
        "needs the append arguments": (args[:6], bias),
        r"must be \[3, H=2, D=16\], got shape \(96,\)": (args, bias.view(-1)),  # c_attn.bias unviewed
        r"must be \[3, H=2, D=16\], got shape \(2, 2, 16\)": (args, bias[:2]),
        "qkv_bias dtype torch.float16 differs": (args, bias.half()),
        "qkv_bias is on meta": (args, bias.to("meta")),
        "qkv_bias must be contiguous": (args, bias.transpose(1, 2).contiguous().transpose(1, 2)),
        "must be a tensor": (args, bias.tolist()),
    }
    for what, (base, qkv_bias) in bad.items():
        for fn in (attn_decode.decode_attention, attn_decode.decode_attention_ref):
            with pytest.raises(ValueError, match=what):
                fn(*base, qkv_bias=qkv_bias)


# --------------------------------------------------------------------------------------------
# GPU: bf16 and real sizes (H100: well under a minute for the whole set)
# --------------------------------------------------------------------------------------------

def gpu_params(cases: dict, odd: dict) -> list:
    """GPT-2 head size (D=64) cases in every dtype, odd head sizes in one half-precision dtype
    each: every (dtype, D, block size) is a kernel compile, and the GPU check has a time budget."""
    params = [pytest.param(c, dt, id=f"{k}-{dtype_id(dt)}") for k, c in cases.items() for dt in GPU_DTYPES]
    params += [pytest.param(c, dt, id=f"{k}-{dtype_id(dt)}") for k, (c, dt) in odd.items()]
    return params


SHORT_64 = [1 + (i * 37) % 130 for i in range(64)]  # 64 prompts of 1..130 tokens
RAGGED_8 = [1, 77, 500, 1000, 63, 129, 300, 2]
GPU_PREFILL_CASES = {
    # id: (seq_lens, q_lens, H, D, block_size)
    "b4-t1024-h12-d64-bs16": ([1024] * 4, [1024] * 4, 12, 64, 16),
    "b1-t2048-h12-d64-bs16": ([2048], [2048], 12, 64, 16),
    "b8-ragged-prefix-h12-d64-bs16": (RAGGED_8, [1, 77, 200, 1000, 1, 128, 37, 2], 12, 64, 16),
    "b64-short-h12-d64-bs16": (SHORT_64, SHORT_64, 12, 64, 16),
}
GPU_PREFILL_ODD = {
    "b3-prefix-h7-d80-bs7": (([97, 300, 1000], [97, 150, 1000], 7, 80, 7), torch.float16),
    "b2-h4-d128-bs32": (([513, 1024], [513, 1024], 4, 128, 32), torch.bfloat16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype", gpu_params(GPU_PREFILL_CASES, GPU_PREFILL_ODD))
def test_prefill_attention_gpu(case, dtype, poison_empty):
    lens, q_lens, H, D, bs = case
    args = prefill_inputs(lens, q_lens, H, D, bs, dtype, "cuda", seed=sum(lens) + D)
    args = (*args, 1 / math.sqrt(D), max(q_lens))
    check_against_ref(attn_prefill.prefill_attention, attn_prefill.prefill_attention_ref, args, dtype,
                      "prefill_attention")


GPU_DECODE_CASES = {
    # id: (seq_lens, H, D, block_size); on an H100 (132 SMs): 44, 6 and 1 (no merge) splits
    "b1-ctx2048-h12-d64-bs16": ([2048], 12, 64, 16),
    "b8-ragged-h12-d64-bs16": ([1, 17, 128, 1000, 2048, 0, 513, 64], 12, 64, 16),
    "b64-ctx1024-h12-d64-bs16": ([1024 - (i * 13) % 200 for i in range(64)], 12, 64, 16),
}
GPU_DECODE_ODD = {
    "b5-h7-d80-bs7": (([97, 0, 1500, 3, 700], 7, 80, 7), torch.bfloat16),
    "b3-h4-d128-bs32": (([2000, 31, 640], 4, 128, 32), torch.float16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype", gpu_params(GPU_DECODE_CASES, GPU_DECODE_ODD))
def test_decode_attention_gpu(case, dtype, poison_empty):
    lens, H, D, bs = case
    args = (*decode_inputs(lens, H, D, bs, dtype, "cuda", seed=sum(lens) + D), D**-0.5)
    check_against_ref(attn_decode.decode_attention, attn_decode.decode_attention_ref, args, dtype, "decode_attention")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
def test_kv_cache_write_gpu(dtype):
    gen = torch.Generator().manual_seed(11)
    N, H, D, bs, num_blocks = 300, 12, 64, 16, 40
    qkv = torch.randn(N, 3, H, D, generator=gen).to(dtype).cuda()
    slots = torch.randperm(num_blocks * bs, generator=gen)[:N].cuda()
    slots[::7] = -1
    caches = [torch.randn(num_blocks, bs, H, D, generator=gen).to(dtype).cuda() for _ in range(2)]
    expected = [c.clone() for c in caches]
    kv_write.kv_cache_write(qkv[:, 1], qkv[:, 2], *caches, slots)
    kv_write.kv_cache_write_ref(qkv[:, 1], qkv[:, 2], *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.gpu
def test_decode_attention_cuda_graph():
    # capture once, then change q and seq_lens in place (a padded bucket row included) and replay
    lens = [700, 5, 1024, 64]
    q, k_cache, v_cache, table, seq_lens = decode_inputs(lens, 12, 64, 16, torch.bfloat16, "cuda", seed=9)
    attn_decode.decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn_decode.decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)
    for new_lens in ([700, 5, 1024, 64], [1, 0, 1000, 65]):
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        expected = attn_decode.decode_attention_ref(*upcast((q, k_cache, v_cache, table, seq_lens, 0.125)))
        assert_close(out, expected, **TOLERANCES[torch.bfloat16], name=f"graph replay {new_lens}")


GPU_APPEND_CASES = {
    # id: (seq_lens, rows with slot -1); H=12, D=64, bs=16. H100: 16 splits, 1 (no merge), 1
    "b1-ctx1024": ([1024], ()),
    "b64-ragged": ([1024 - (i * 13) % 200 for i in range(64)], (5,)),
    "b256-ragged-pad": ([1 + (i * 37) % 1024 for i in range(250)] + [0] * 6, (0, 100)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True], ids=["append", "append+bias"])
@pytest.mark.parametrize("case", GPU_APPEND_CASES.values(), ids=GPU_APPEND_CASES.keys())
def test_decode_attention_append_gpu(case, bias, poison_empty):
    # with the bias, the caches must match torch's fp32 -> bf16 rounding exactly
    lens, skip = case
    args, pad_slots = append_inputs(lens, 12, 64, 16, torch.bfloat16, "cuda", seed=len(lens), skip=skip)
    qkv_bias = random_qkv_bias(args, len(lens)) if bias else None
    check_append(args, torch.bfloat16, f"append B={len(lens)} bias={bias}", pad_slots, qkv_bias=qkv_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1023], [1 + (i * 37) % 1024 for i in range(60)] + [0] * 4],
                         ids=["b1-ctx1023", "b64-ragged-pad"])
def test_decode_attention_bias_is_linear_with_bias_gpu(lens, poison_empty):
    # GPT-2 124M sizes (C = 768), bf16, the projection through cuBLAS
    check_bias_is_linear_with_bias(lens, 12, 64, 16, torch.bfloat16, "cuda", seed=len(lens))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True], ids=["append", "append+bias"])
def test_decode_attention_append_cuda_graph(bias):
    # capture the fused step once, then replay three decode steps: new q/k/v in place, seq_lens
    # advanced, new slots, a row turning into graph padding (and one out of padding); the bias is
    # a fixed weight (read at replay)
    steps = [[700, 5, 1023, 64, 0], [701, 6, 1024, 65, 1], [702, 0, 1024, 66, 2]]
    H, D, bs = 12, 64, 16
    # pages for all steps; not poisoned: the last positions of these lengths lie past early steps' keys
    args, _ = append_inputs([702, 6, 1024, 66, 2], H, D, bs, torch.bfloat16, "cuda", seed=9, poison=False)
    q, table, seq_lens, k_new, v_new, slots = args[0], args[3], args[4], args[6], args[7], args[8]
    assert q.stride(0) == k_new.stride(0) == 3 * H * D  # views of one [B, 3, H, D] output

    def set_step(lens):
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        pos = (seq_lens.long() - 1).clamp_min(0)
        new_slots = table.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs
        slots.copy_(torch.where(seq_lens > 0, new_slots, -1))

    qkv_bias = random_qkv_bias(args, 9) if bias else None
    set_step(steps[0])
    run_append(args, qkv_bias)  # compile outside the capture (its writes are redone by the first replay)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_append(args, qkv_bias)

    def replay(_):
        graph.replay()
        return out

    for lens in steps:
        set_step(lens)
        check_append(args, torch.bfloat16, f"graph replay {lens}", run=replay, qkv_bias=qkv_bias)


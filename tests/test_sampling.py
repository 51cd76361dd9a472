"""Sampling: `sample` (Triton; the interpreter on CPU) and `sample_ref` (eager), tested statistically.

Support: a draw never leaves the exact kept set (computed here in fp64 from HF's rules, ties kept).
Distribution: many draws of one row against the exact filtered softmax (chi-square p-value and
cosine similarity). Determinism: seeds reproduce, a row's draw does not depend on the other rows,
offsets change the draw. Flags: NaN / +inf / all -inf rows. Interpreter cases use small V and a
few thousand draws in all; the `gpu` cases use V=50257 and >= 10^6 draws.
"""

import pytest
import torch
import triton

from gptfast.bench.op_cases import sampling as sampling_cases
from gptfast.ops import sampling
from gptfast.ops.common import assert_close


def _split_sample(logits, *args, **kwargs):
    """`sample` with pass 1 split across programs at any batch, in chunks of about V / 8 columns
    (32 at least), so that small vocabularies span several chunks (on a GPU: rows of batches up to
    32, 1024 columns a chunk)."""
    block = max(32, triton.next_power_of_2(-(-logits.shape[-1] // 8)))
    saved = sampling._SPLIT_MAX_BATCH, sampling._SPLIT_MIN_CHUNKS, sampling._BLOCK
    sampling._SPLIT_MAX_BATCH, sampling._SPLIT_MIN_CHUNKS, sampling._BLOCK = 10**9, 1, block
    try:
        return sampling.sample(logits, *args, **kwargs)
    finally:
        sampling._SPLIT_MAX_BATCH, sampling._SPLIT_MIN_CHUNKS, sampling._BLOCK = saved


IMPLS = {"triton": sampling.sample, "triton-split": _split_sample, "ref": sampling.sample_ref}


@pytest.fixture
def full_row(monkeypatch):
    """Shrink the kernel's scratch to 16 slots, so that small-V searches run on the full row
    (re-reading it) and move to the scratch mid-search, as a 50257-wide row does."""
    monkeypatch.setattr(sampling, "_CAP", 16)


def params(B, temperature=1.0, top_k=0, top_p=1.0, seed=0, offset=0, device="cpu"):
    """Per-row sampling parameters (scalars broadcast to [B])."""
    def vec(v, dtype):
        return torch.as_tensor(v, dtype=dtype).expand(B).contiguous().to(device)

    return (vec(temperature, torch.float32), vec(top_k, torch.int32), vec(top_p, torch.float32),
            sampling.row_seeds(seed, B, device), vec(offset, torch.int64))


def kept_mask(logits_row, temperature, top_k, top_p):
    """The exact kept set of one row [V] (bool): HF's top-k then top-p, every tie at a boundary kept."""
    x = logits_row.float() / temperature  # fp32 scaling, as HF and the kernel do
    V = x.numel()
    keep = torch.isfinite(x)
    if 0 < top_k < V:
        kth = torch.sort(x, descending=True).values[top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        xd = x.double().masked_fill(~keep, float("-inf"))
        q = torch.softmax(xd, dim=0)
        asc, order = torch.sort(xd)
        cum = torch.cumsum(q[order], dim=0)
        # mass strictly above each value: total minus the mass of values <= it
        upto = torch.searchsorted(asc, xd, right=True) - 1
        above = cum[-1] - cum[upto]
        keep &= above < top_p
    return keep


def filtered_probs(logits_row, temperature, top_k, top_p):
    """The exact distribution [V] (fp64) that a draw should follow."""
    x = (logits_row.float() / temperature).double()
    x = x.masked_fill(~kept_mask(logits_row, temperature, top_k, top_p), float("-inf"))
    return torch.softmax(x, dim=0)


def chi2_pvalue(counts, probs):
    """Pearson chi-square p-value of `counts` against `probs` (bins expecting < 5 pooled)."""
    n = counts.sum().double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 1e-9:  # nothing pooled
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def cosine(counts, probs):
    c = counts.double()
    return float(c @ probs / (c.norm() * probs.norm()))


def with_ties(V, gen, dtype=torch.float32):
    """A row with runs of exactly equal values around the top (ties at k-th value / top-p boundary)."""
    x = torch.randn(V, generator=gen) * 2
    top = torch.argsort(x, descending=True)
    x[top[3:9]] = x[top[3]].item()  # ranks 3..8 tied
    x[top[20:30]] = x[top[20]].item()  # ranks 20..29 tied
    return x.to(dtype)


def draw_many(impl, row, n, temperature, top_k, top_p, seed):
    """n draws of one row (n copies with independent row seeds), with the statuses."""
    logits = row[None].expand(n, -1).contiguous()
    return impl(logits, *params(n, temperature, top_k, top_p, seed=seed, device=row.device))


# --- greedy / top_k = 1 ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("V", [997, 1000])
def test_greedy_and_top1_are_argmax(impl, dtype, V):
    B = 12
    # a strided view (row stride > V) with exact ties at the max in two rows
    wide = torch.randn(B, V + 37, dtype=torch.float32).to(dtype)
    logits = wide[:, :V]
    logits[3, 10] = logits[3, 500] = logits[3].max() + 1  # tie: lowest index wins
    logits[4, :] = float("-inf")
    logits[4, V - 1] = 0.0  # one finite logit, last column
    top = logits[6:].float().argmax(dim=-1, keepdim=True)  # top_k=1 rows: a unique max (ties would be kept)
    logits[6:].scatter_(1, top, logits[6:].gather(1, top) + 1)
    temperature = torch.tensor([0.0] * 6 + [0.7] * 6)
    top_k = torch.tensor([0] * 6 + [1] * 6, dtype=torch.int32)
    top_p = torch.tensor([1.0] * 6 + [0.5] * 6)
    tokens, status = IMPLS[impl](logits, temperature, top_k, top_p, sampling.row_seeds(1, B, "cpu"),
                                 torch.arange(B, dtype=torch.int64))
    expected = torch.argmax(logits.float(), dim=-1)
    assert expected[3] == 10
    assert status.tolist() == [0] * B
    assert tokens.tolist() == expected.tolist(), f"tokens {tokens.tolist()}, argmax {expected.tolist()}"


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("V", [1, 2, 3])
def test_tiny_vocab(impl, V):
    B = 4
    logits = torch.randn(B, V)
    logits[3] = float("-inf")
    logits[3, V - 1] = 1.0
    temperature = torch.tensor([0.0, 1.0, 0.5, 2.0])
    top_k = torch.tensor([0, 1, 0, 2], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.3])
    tokens, status = IMPLS[impl](logits, temperature, top_k, top_p, sampling.row_seeds(2, B, "cpu"),
                                 torch.zeros(B, dtype=torch.int64))
    assert status.tolist() == [0] * B
    assert tokens[0] == torch.argmax(logits[0]) and tokens[1] == torch.argmax(logits[1]) and tokens[3] == V - 1
    assert kept_mask(logits[2], 0.5, 0, 0.5)[tokens[2]]


# --- support ------------------------------------------------------------------------------------

SUPPORT_CASES = {
    "k5-ties": (0.9, 5, 1.0),  # the 5th value is tied with ranks 3..8
    "k25-ties": (1.0, 25, 1.0),
    "p-ties": (1.0, 0, 0.05),
    "k30-p0.7": (0.8, 30, 0.7),
    "p0.9": (1.3, 0, 0.9),
}


SUPPORT_VARIANTS = {  # name: (impl, logits dtype, scratch of 16 slots)
    "triton-fp32": ("triton", torch.float32, False),
    "triton-fp32-full-row": ("triton", torch.float32, True),
    "triton-fp16-full-row": ("triton", torch.float16, True),
    "ref-fp32": ("ref", torch.float32, False),
    "ref-fp16": ("ref", torch.float16, False),
}


@pytest.mark.parametrize("variant", SUPPORT_VARIANTS, ids=str)
@pytest.mark.parametrize("case", SUPPORT_CASES, ids=str)
def test_support(variant, case, request):
    impl, dtype, small_scratch = SUPPORT_VARIANTS[variant]
    if small_scratch:
        request.getfixturevalue("full_row")
    temperature, top_k, top_p = SUPPORT_CASES[case]
    gen = torch.Generator().manual_seed(list(SUPPORT_CASES).index(case))
    row = with_ties(1000, gen, dtype)
    row[torch.randint(0, 1000, (50,), generator=gen)] = float("-inf")  # masked tokens
    n = 24 if impl == "triton" else 4000
    tokens, status = draw_many(IMPLS[impl], row, n, temperature, top_k, top_p, seed=7)
    keep = kept_mask(row, temperature, top_k, top_p)
    assert (status == 0).all()
    outside = tokens[~keep[tokens]]
    assert outside.numel() == 0, f"{outside.numel()} of {n} draws outside the kept set: {outside[:8].tolist()}"


def test_support_ties_reach_every_kept_token():
    """With the kept set small, the kernel draws every kept token, the tied ones included."""
    gen = torch.Generator().manual_seed(11)
    row = with_ties(997, gen)
    keep = kept_mask(row, 1.0, 5, 1.0)
    assert keep.sum() == 9  # ranks 0..8: the 5th value is tied down to rank 8
    tokens, status = draw_many(sampling.sample, row * 0.05, 120, 1.0, 5, 1.0, seed=3)
    assert (status == 0).all()
    assert set(tokens.tolist()) == set(kept_mask(row * 0.05, 1.0, 5, 1.0).nonzero().flatten().tolist())


@pytest.mark.parametrize("small_scratch", [False, True], ids=["scratch", "full-row"])
def test_support_larger_vocab(small_scratch, request):
    if small_scratch:
        request.getfixturevalue("full_row")
    gen = torch.Generator().manual_seed(5)
    row = with_ties(5003, gen)
    row[4000:4100] = float("-inf")
    for temperature, top_k, top_p in [(0.7, 40, 0.8), (1.0, 0, 0.6)]:
        tokens, status = draw_many(sampling.sample, row, 10, temperature, top_k, top_p, seed=1)
        keep = kept_mask(row, temperature, top_k, top_p)
        assert (status == 0).all() and keep[tokens].all(), f"outside the kept set: {tokens[~keep[tokens]]}"


def test_masks_far_below_and_negative_logits(full_row):
    """Finite masks (-1e30, HF's finfo.min) and an all-negative row: the key-space pivots handle them."""
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(1000, generator=gen) - 50.0
    row[::3] = torch.finfo(torch.float32).min
    row[1::7] = -1e30
    for top_k, top_p in [(7, 1.0), (0, 0.5), (7, 0.5)]:
        tokens, status = draw_many(sampling.sample, row, 8, 1.0, top_k, top_p, seed=4)
        keep = kept_mask(row, 1.0, top_k, top_p)
        assert (status == 0).all() and keep[tokens].all(), f"k={top_k} p={top_p}: {tokens[~keep[tokens]]}"


# --- distribution -------------------------------------------------------------------------------

DIST_CASES = {  # name: (V, temperature, top_k, top_p, draws through the interpreter)
    "plain": (997, 1.0, 0, 1.0, 600),
    # the draw races chunks of 1024 columns; 800 draws: the cosine expected from exact sampling is
    # 0.9956 (0.991 at 400, too close to the 0.99 bound)
    "plain-3-chunks": (5003, 1.0, 0, 1.0, 800),
    "k6-p0.95": (997, 0.7, 6, 0.95, 300),
}


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("case", DIST_CASES, ids=str)
def test_distribution(impl, case):
    V, temperature, top_k, top_p, n = DIST_CASES[case]
    if impl == "ref":
        n = 20000
    gen = torch.Generator().manual_seed(23)
    row = torch.randn(V, generator=gen) * 3  # peaked: a few dozen tokens carry the mass
    probs = filtered_probs(row, temperature, top_k, top_p)
    tokens, status = draw_many(IMPLS[impl], row, n, temperature, top_k, top_p, seed=99)
    assert (status == 0).all()
    counts = torch.bincount(tokens, minlength=row.numel())
    pvalue, cos = chi2_pvalue(counts, probs), cosine(counts, probs)
    assert pvalue > 1e-4 and cos > 0.99, f"{n} draws: chi-square p = {pvalue:.2e}, cosine {cos:.4f}"


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_seeds_reproduce_rows_independent_offsets_change(impl):
    fn = IMPLS[impl]
    B, V = 12, 1000
    logits = torch.randn(B, V) * 0.5  # flat: many tokens kept, so draws differ between offsets
    temperature = torch.rand(B) + 0.5
    top_k = torch.tensor([0, 100, 900, 0] * 3, dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.95, 0.9] * 4)
    seeds = sampling.row_seeds(1234, B, "cpu")
    offsets = torch.arange(B, dtype=torch.int64) * 3
    first, s1 = fn(logits, temperature, top_k, top_p, seeds, offsets)
    again, _ = fn(logits, temperature, top_k, top_p, seeds, offsets)
    assert (s1 == 0).all() and first.tolist() == again.tolist()
    perm = torch.randperm(B)
    shuffled, _ = fn(logits[perm], temperature[perm], top_k[perm], top_p[perm], seeds[perm], offsets[perm])
    assert shuffled.tolist() == first[perm].tolist(), "a row's draw changed when the rows were permuted"
    later, _ = fn(logits, temperature, top_k, top_p, seeds, offsets + 1)
    assert (later != first).sum() >= B // 2, f"offset+1 left {(later == first).sum()} of {B} draws unchanged"
    other, _ = fn(logits, temperature, top_k, top_p, sampling.row_seeds(4321, B, "cpu"), offsets)
    assert (other != first).sum() >= B // 2


def test_row_seeds():
    a = sampling.row_seeds(0, 64, "cpu")
    assert a.dtype == torch.int64 and a.shape == (64,)
    assert a.unique().numel() == 64
    assert torch.equal(a, sampling.row_seeds(0, 64, "cpu"))
    assert torch.equal(a[:10], sampling.row_seeds(0, 10, "cpu"))  # row i's seed ignores num_rows
    assert not torch.equal(a, sampling.row_seeds(1, 64, "cpu"))
    assert sampling.row_seeds(2**64 + 5, 3, "cpu").equal(sampling.row_seeds(5, 3, "cpu"))


# --- filters off -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_filters_off_match_no_filter(impl):
    """top_k = 0 / >= V and top_p = 1 are exactly the unfiltered draw (same seed, same offset)."""
    fn = IMPLS[impl]
    B, V = 8, 997
    logits = torch.randn(B, V)
    _, _, _, seeds, offsets = params(B, seed=5)
    temperature = torch.full((B,), 0.9)
    base, _ = fn(logits, temperature, torch.zeros(B, dtype=torch.int32), torch.ones(B), seeds, offsets)
    for k in (V, V + 10):
        got, _ = fn(logits, temperature, torch.full((B,), k, dtype=torch.int32), torch.ones(B), seeds, offsets)
        assert got.tolist() == base.tolist(), f"top_k={k} changed the draw"


# --- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bad_rows_flagged_others_unaffected(impl, dtype):
    fn = IMPLS[impl]
    B, V = 7, 1000
    logits = (torch.randn(B, V) * 2).to(dtype)
    logits[1, 17] = float("nan")
    logits[2, 900] = float("inf")
    logits[3] = float("-inf")
    logits[4] = float("-inf")
    logits[4, 5] = float("nan")  # NaN wins over "no finite logit"
    logits[5, 3] = float("inf")
    logits[6, :500] = float("-inf")  # -inf is a mask: never drawn
    temperature = torch.tensor([0.8, 0.8, 0.0, 1.0, 1.0, 0.0, 2.0])
    top_k = torch.tensor([20, 0, 0, 5, 0, 0, 0], dtype=torch.int32)
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0])
    seeds, offsets = sampling.row_seeds(9, B, "cpu"), torch.zeros(B, dtype=torch.int64)
    tokens, status = fn(logits, temperature, top_k, top_p, seeds, offsets)
    assert status.dtype == torch.int32 and tokens.dtype == torch.int64
    assert status.tolist() == [0, 1, 1, 2, 1, 1, 0]
    assert tokens[1:6].tolist() == [-1] * 5
    clean = [0, 6]
    alone, _ = fn(logits[clean], temperature[clean], top_k[clean], top_p[clean], seeds[clean], offsets[clean])
    assert tokens[clean].tolist() == alone.tolist(), "a flagged row changed another row's draw"
    assert tokens[6] >= 500
    assert kept_mask(logits[0], 0.8, 20, 0.9)[tokens[0]]


def test_minus_inf_never_drawn_flat_row(full_row):
    """A flat row where -inf entries sit between equal finite ones."""
    V = 1000
    row = torch.zeros(V)
    row[::2] = float("-inf")
    tokens, status = draw_many(sampling.sample, row, 64, 1.0, 0, 1.0, seed=8)
    assert (status == 0).all() and (tokens % 2 == 1).all(), tokens[tokens % 2 == 0]
    tokens, status = draw_many(sampling.sample, row, 16, 1.0, 3, 0.5, seed=8)
    assert (status == 0).all() and (tokens % 2 == 1).all(), tokens[tokens % 2 == 0]


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_bad_inputs_raise(impl):
    fn = IMPLS[impl]
    B, V = 4, 100
    good = (torch.randn(B, V),) + params(B)
    cases = [
        ((torch.randn(V),) + good[1:], ValueError, "2-D"),
        ((torch.randn(B, V, dtype=torch.float64),) + good[1:], TypeError, "logits dtype"),
        (good[:1] + (good[1].double(),) + good[2:], TypeError, "temperature"),
        (good[:2] + (good[2].long(),) + good[3:], TypeError, "top_k"),
        (good[:3] + (good[3][:2],) + good[4:], ValueError, "top_p"),
        (good[:4] + (good[4].int(),) + good[5:], TypeError, "seeds"),
        (good[:5] + (good[5].reshape(B, 1),), ValueError, "offsets"),
        (good[:5] + ([0] * B,), TypeError, "offsets"),
    ]
    if torch.cuda.is_available():
        cases.append((good[:5] + (good[5].cuda(),), ValueError, "device"))
    for args, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn(*args)


def test_ref_matches_hf_warpers():
    """The reference's filter is transformers' TopK/TopP warpers (no ties in random data)."""
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    x = torch.randn(3, 1000) * 2
    for k, p in [(50, 0.9), (0, 0.7), (10, 1.0)]:
        ours = sampling._filter_ref(x, torch.full((3,), k, dtype=torch.int32), torch.full((3,), p))
        hf = x
        if k:
            hf = TopKLogitsWarper(k)(None, hf)
        if p < 1:
            hf = TopPLogitsWarper(p)(None, hf)
        assert torch.equal(torch.isinf(ours), torch.isinf(hf)), f"k={k} p={p}"
    del transformers


# --- GPU: V = 50257, >= 10^6 draws -------------------------------------------------------------


GPU_DIST_CASES = {  # name: (temperature, top_k, top_p, logit scale, minimum cosine similarity)
    "plain": (1.0, 0, 1.0, 4.0, 0.999),
    "k50-p0.9": (0.8, 50, 0.9, 4.0, 0.999),
    "p0.95": (1.0, 0, 0.95, 4.0, 0.999),
    "k200": (1.0, 200, 1.0, 4.0, 0.999),
    # a flat row: ~40000 tokens kept (more than the scratch holds, so the kernel stays on the full
    # row); 10^6 draws over that many tokens give a cosine of ~0.98 by sampling noise alone
    "flat-p0.9": (1.0, 0, 0.9, 0.5, 0.95),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_DIST_CASES, ids=str)
def test_gpu_distribution(dtype, case):
    temperature, top_k, top_p, scale, min_cos = GPU_DIST_CASES[case]
    V, B, steps = 50257, 4096, 256  # 1,048,576 draws
    gen = torch.Generator().manual_seed(31)
    row = (torch.randn(V, generator=gen) * scale).to(dtype)
    probs = filtered_probs(row, temperature, top_k, top_p)
    logits = row.cuda()[None].expand(B, -1)  # row stride 0: the kernel takes any strides
    t, k, p, seeds, offsets = params(B, temperature, top_k, top_p, seed=3, device="cuda")
    counts = torch.zeros(V, dtype=torch.int64, device="cuda")
    keep = kept_mask(row, temperature, top_k, top_p).cuda()
    for _ in range(steps):
        tokens, status = sampling.sample(logits, t, k, p, seeds, offsets)
        offsets += 1
        assert bool((status == 0).all())
        assert bool(keep[tokens].all()), "a draw left the kept set"
        counts += torch.bincount(tokens, minlength=V)
    counts = counts.cpu()
    pvalue, cos = chi2_pvalue(counts, probs), cosine(counts, probs)
    assert pvalue > 1e-4 and cos > min_cos, f"{B * steps} draws: chi-square p = {pvalue:.2e}, cosine {cos:.5f}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_support_greedy_flags_and_ref(dtype):
    """V=50257, B=256 mixed rows: support, greedy, flags, batch-shuffle invariance, ref on CUDA."""
    B, V = 256, 50257
    logits = (torch.randn(B, V, device="cuda") * 3).to(dtype)
    logits[:, ::97] = float("-inf")
    logits[5, 7] = float("nan")
    logits[6] = float("-inf")
    temperature = torch.rand(B, device="cuda") + 0.3
    temperature[::9] = 0.0
    top_k = torch.randint(0, 300, (B,), device="cuda", dtype=torch.int32)
    top_p = torch.rand(B, device="cuda") * 0.9 + 0.1
    top_p[::4] = 1.0
    seeds = sampling.row_seeds(77, B, "cuda")
    offsets = torch.randint(0, 1000, (B,), device="cuda")
    tokens, status = sampling.sample(logits, temperature, top_k, top_p, seeds, offsets)
    ref_tokens, ref_status = sampling.sample_ref(logits, temperature, top_k, top_p, seeds, offsets)
    assert torch.equal(status, ref_status)
    expected = torch.zeros(B, dtype=torch.int32)
    expected[5], expected[6] = 1, 2
    assert status.cpu().tolist() == expected.tolist()
    ok = (status == 0).cpu()
    greedy = (temperature <= 0).cpu() & ok
    assert torch.equal(tokens.cpu()[greedy], torch.argmax(logits.float(), -1).cpu()[greedy])
    for r in ok.nonzero().flatten().tolist():
        if temperature[r] > 0:
            keep = kept_mask(logits[r].cpu(), float(temperature[r]), int(top_k[r]), float(top_p[r]))
            assert keep[tokens[r].cpu()] and keep[ref_tokens[r].cpu()], f"row {r} left the kept set"
    perm = torch.randperm(B, device="cuda")
    shuffled, _ = sampling.sample(logits[perm], temperature[perm], top_k[perm], top_p[perm], seeds[perm],
                                  offsets[perm])
    assert torch.equal(shuffled, tokens[perm])


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_draws_fresh():
    B, V = 64, 50257
    logits = torch.randn(B, V, device="cuda")
    t, k, p, seeds, offsets = params(B, 1.0, 0, 0.95, seed=1, device="cuda")
    sampling.sample(logits, t, k, p, seeds, offsets)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, status = sampling.sample(logits, t, k, p, seeds, offsets)
    graph.replay()
    first = tokens.clone()
    eager, _ = sampling.sample(logits, t, k, p, seeds, offsets)
    assert torch.equal(first, eager), "a replay differs from the eager call with the same offsets"
    offsets += 1
    graph.replay()
    assert (tokens != first).sum() > B // 2
    assert_close(status.float(), torch.zeros(B, device="cuda"), 0, 0, "status")


# --- the split pass 1 -------------------------------------------------------------------------


def _mixed_rows(V, gen):
    """Rows of every kind: greedy (with ties at the max), plain sampling, top-k (ties), top-p,
    both, -inf masks, a NaN row and an all -inf row; returns the sample() arguments."""
    B = 14
    logits = torch.randn(B, V, generator=gen) * 2
    if V > 30:
        logits[1] = with_ties(V, gen)
    logits[2, ::3] = float("-inf")
    logits[3, V // 2] = logits[3, V // 3] = logits[3].max() + 1  # greedy tie: lowest column
    logits[12, 5 % V] = float("nan")
    logits[13] = float("-inf")
    temperature = torch.tensor([0.0, 1.0, 0.8, 0.0, 1.3, 0.7, 1.0, 0.5, 1.0, 2.0, 0.9, 1.0, 1.0, 1.0])
    top_k = torch.tensor([0, 5, 0, 0, 0, 3, 17, 0, 2, 40, 0, 1, 0, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.9, 1.0, 0.8, 0.3, 1.0, 0.95, 0.5, 1.0, 1.0, 1.0])
    offsets = torch.randint(0, 2**40, (B,), generator=gen)
    return logits, temperature, top_k, top_p, sampling.row_seeds(V, B, "cpu"), offsets


@pytest.mark.parametrize("V, block", [(97, 32), (1000, 256), (3, 32)])
def test_split_and_per_row_pass1_draw_the_same_tokens(V, block, monkeypatch):
    """A row's draw must not depend on the batch it is in (batches <= 32 take the split path):
    the split and per-row pass 1 give the same tokens and statuses, bit for bit."""
    monkeypatch.setattr(sampling, "_BLOCK", block)
    monkeypatch.setattr(sampling, "_SPLIT_MIN_CHUNKS", 1)
    args = _mixed_rows(V, torch.Generator().manual_seed(V))
    outs = {}
    for name, max_batch in (("per-row", 0), ("split", 10**9)):
        monkeypatch.setattr(sampling, "_SPLIT_MAX_BATCH", max_batch)
        outs[name] = sampling.sample(*args)
    (tok_r, st_r), (tok_s, st_s) = outs["per-row"], outs["split"]
    assert st_r.tolist() == st_s.tolist() and tok_r.tolist() == tok_s.tolist()
    assert st_r[12] == 1 and st_r[13] == 2 and (st_r[:12] == 0).all()
    if V > 3:
        assert tok_r[3] == V // 3 and tok_r[0] == args[0][0].argmax()
    assert sampling_cases.check_draws(outs["split"], sampling.sample_ref(*args), args) is None


@pytest.mark.parametrize("B, V, grid", [(1, 50257, (1, 50)), (32, 3000, (32, 3)), (33, 3000, None)])
def test_split_grid_spreads_a_row_over_many_programs(B, V, grid, monkeypatch):
    """At GPT-2's vocabulary, batch 1 runs pass 1 as 50 programs (>= 32); batches up to 32 split
    every row into its 1024-column chunks, larger ones run one program per row."""
    grids = []
    real = sampling._sample_split_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(sampling, "_sample_split_kernel", Recorder())
    gen = torch.Generator().manual_seed(B)
    logits = torch.randn(B, V, generator=gen)
    tokens, status = sampling.sample(logits, *params(B, temperature=0.0))  # greedy: pass 1 only
    assert grids == ([grid] if grid else [])
    assert (status == 0).all() and tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_out_tensors_are_written(impl):
    B, V = 3, 97
    logits = torch.randn(B, V)
    out = (torch.full((B,), -7, dtype=torch.int64), torch.full((B,), -7, dtype=torch.int32))
    tokens, status = IMPLS[impl](logits, *params(B, temperature=0.0), out=out)
    assert tokens is out[0] and status is out[1]
    assert tokens.tolist() == logits.argmax(-1).tolist() and status.tolist() == [0] * B
    with pytest.raises(ValueError, match="out status must be a contiguous"):
        IMPLS[impl](logits, *params(B), out=(out[0], out[1].long()))

"""Tests of the small-batch decode ops: ln_linear (layernorm_linear, embed_layernorm_linear),
proj_residual (linear_residual, attn_merge_linear_residual), attn_decode.decode_attention_partials
and head_argmax (layernorm_head_argmax), and of the model's GEMV decode step built from them.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on tiny shapes with
awkward sizes (1 column, 97 columns, K not a power of 2, more than 8 rows); outputs come from
NaN-poisoned allocations so unwritten elements show. The kernels use no tl.dot, so bf16 runs in
the interpreter too (COMPAT(triton 3.6): its fp32 -> bf16 casts truncate where a GPU rounds: within
the bf16 tolerance). References are computed in fp32 on upcast inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptfast.bench.op_cases import head_argmax as head_argmax_cases
from gptfast.bench.op_cases import ln_linear as ln_linear_cases
from gptfast.bench.op_cases import proj_residual as proj_residual_cases
from gptfast.ops import attn_decode, head_argmax, ln_linear, proj_residual
from gptfast.ops.common import TOLERANCES, assert_close, backend

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def up(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def tol(dtype, scale=4.0):
    """The dtype's tolerance; GEMV outputs sum K products, so atol is scaled up a little."""
    t = TOLERANCES[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"])


def linear_inputs(R, K, N, dtype, seed, affine=True, bias=True, pad=0):
    g = torch.Generator().manual_seed(seed)
    x = (2.0 + torch.randn(R, K + pad, generator=g)).to(dtype)[:, pad // 2: pad // 2 + K]  # off-centre rows
    lnw = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype) if affine else None
    lnb = (0.3 * torch.randn(K, generator=g)).to(dtype) if affine else None
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = (0.5 * torch.randn(N, generator=g)).to(dtype) if bias else None
    return x, lnw, lnb, w, b


# --------------------------------------------------------------------------------------------
# layernorm_linear, embed_layernorm_linear
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 64, 97), (3, 96, 1), (8, 97, 40), (9, 48, 33), (2, 768, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("R,K,N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_layernorm_linear_matches_reference(R, K, N, dtype, gelu, poison_empty):
    x, lnw, lnb, w, b = linear_inputs(R, K, N, dtype, seed=R * 1000 + K + N, pad=6)
    assert x.stride(0) == K + 6  # a strided row view
    out = ln_linear.layernorm_linear(x, lnw, lnb, 1e-5, w, b, gelu=gelu)
    ref = ln_linear.layernorm_linear_ref(up(x), up(lnw), up(lnb), 1e-5, up(w), up(b), gelu=gelu)
    assert out.dtype == dtype and out.shape == (R, N)
    assert_close(out, ref, **tol(dtype), name=f"layernorm_linear {dtype_id(dtype)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_layernorm_linear_without_affine_or_bias_and_fp32_out(dtype, poison_empty):
    x, _, _, w, _ = linear_inputs(2, 80, 70, dtype, seed=5, affine=False, bias=False)
    out = ln_linear.layernorm_linear(x, None, None, 1e-5, w, None, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    # the head's fp32 logits: the accumulator is not rounded to the dtype first
    ref = ln_linear.layernorm_linear_ref(up(x), None, None, 1e-5, up(w), None)
    assert_close(out, ref, **tol(dtype), name="layernorm_linear fp32 out")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("R,K,N", [(1, 64, 97), (5, 40, 3), (9, 33, 20)], ids=lambda v: str(v))
def test_embed_layernorm_linear_matches_reference(R, K, N, dtype, poison_empty):
    g = torch.Generator().manual_seed(R + K + N)
    V, P = 50, 17
    tokens = torch.randint(0, V, (R,), generator=g)
    positions = torch.randint(0, P, (R,), generator=g)
    wte = torch.randn(V, K + 3, generator=g).to(dtype)[:, :K]  # strided rows
    wpe = (0.5 + torch.randn(P, K, generator=g)).to(dtype)
    _, lnw, lnb, w, b = linear_inputs(R, K, N, dtype, seed=R + 7)
    out, s = ln_linear.embed_layernorm_linear(tokens, positions, wte, wpe, lnw, lnb, 1e-5, w, b)
    ref_out, ref_s = ln_linear.embed_layernorm_linear_ref(tokens, positions, up(wte), up(wpe), up(lnw), up(lnb),
                                                          1e-5, up(w), up(b))
    # s is the rounded sum of two rows: exact in fp32, one rounding otherwise
    assert_close(s, ref_s, **TOLERANCES[dtype], name="embed s")
    assert_close(out, ref_out, **tol(dtype), name="embed out")


def test_ln_linear_rejects_bad_arguments():
    x, lnw, lnb, w, b = linear_inputs(2, 16, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K=16\]"):
        ln_linear.layernorm_linear(x, lnw, lnb, 1e-5, w.t(), b)
    with pytest.raises(ValueError, match="weight dtype"):
        ln_linear.layernorm_linear(x, lnw, lnb, 1e-5, w.half(), b)
    with pytest.raises(ValueError, match=r"bias must be 1-D \[8\]"):
        ln_linear.layernorm_linear(x, lnw, lnb, 1e-5, w, b[:3])
    with pytest.raises(ValueError, match="eps must be"):
        ln_linear.layernorm_linear(x, lnw, lnb, float("nan"), w, b)
    with pytest.raises(ValueError, match="out_dtype"):
        ln_linear.layernorm_linear(x, lnw, lnb, 1e-5, w, b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="1-D int64"):
        ln_linear.embed_layernorm_linear(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64),
                                         x, x, lnw, lnb, 1e-5, w, b)


# --------------------------------------------------------------------------------------------
# linear_residual
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("R,K,N", [(1, 96, 97), (4, 300, 1), (8, 64, 40), (9, 48, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_residual_matches_reference(R, K, N, dtype, bias, poison_empty):
    x, _, _, w, b = linear_inputs(R, K, N, dtype, seed=R + K + N, bias=bias, pad=2)
    g = torch.Generator().manual_seed(1)
    res = (3 * torch.randn(R, N + 5, generator=g)).to(dtype)[:, :N]  # strided residual rows
    out = proj_residual.linear_residual(x, w, b, res)
    ref = proj_residual.linear_residual_ref(up(x), up(w), up(b), up(res))
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, **tol(dtype), name="linear_residual")


def test_linear_residual_rejects_bad_residual():
    x, _, _, w, b = linear_inputs(2, 16, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"residual must have 8 columns"):
        proj_residual.linear_residual(x, w, b, torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"residual must be \[R=2, N=8\]"):
        proj_residual.linear_residual(x, w, b, torch.zeros(3, 8))


# --------------------------------------------------------------------------------------------
# decode_attention_partials + attn_merge_linear_residual
# --------------------------------------------------------------------------------------------


def paged_decode_inputs(B, H, D, bs, lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, -(-max(lens) // bs))
    num_blocks = B * max_blocks + 1
    k_cache = torch.randn(num_blocks, bs, H, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, H, D, generator=g).to(dtype)
    tables = (torch.randperm(num_blocks - 1, generator=g) + 1).view(B, max_blocks).int()
    lens_t = torch.tensor(lens, dtype=torch.int32)
    qkv = torch.randn(B, 3, H, D, generator=g).to(dtype)
    pos = (lens_t.long() - 1).clamp_min(0)
    slots = tables[torch.arange(B), pos // bs].long() * bs + pos % bs
    bias = (0.5 * torch.randn(3, H, D, generator=g)).to(dtype)
    return qkv, k_cache, v_cache, tables, lens_t, slots, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_splits", [None, 1, 3], ids=["auto", "s1", "s3"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["append", "append+bias"])
def test_decode_attention_partials_match_reference_and_merge_to_decode_attention(dtype, num_splits, with_bias,
                                                                               poison_empty):
    B, H, D, bs = 4, 2, 16, 4
    lens = [1, 0, 37, 130]  # a single key, a padding row, ragged tails, many tiles
    qkv, kc, vc, tables, lens_t, slots, bias = paged_decode_inputs(B, H, D, bs, lens, dtype, seed=3)
    bias = bias if with_bias else None
    q, k, v = qkv.unbind(1)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    acc, ml = attn_decode.decode_attention_partials(q, kc, vc, tables, lens_t, D**-0.5, k, v, slots, bias,
                                                  num_splits=num_splits)
    racc, rml = attn_decode.decode_attention_partials_ref(q, kc_ref, vc_ref, tables, lens_t, D**-0.5, k, v, slots,
                                                        bias, num_splits=num_splits)
    assert acc.shape == racc.shape and acc.shape[2] == (num_splits or acc.shape[2])
    assert_close(ml[..., 0], rml[..., 0], **TOLERANCES[dtype], name="partials m")
    assert_close(ml[..., 1], rml[..., 1], **TOLERANCES[dtype], name="partials l")
    assert_close(acc, racc, atol=TOLERANCES[dtype]["atol"] * 10, rtol=TOLERANCES[dtype]["rtol"], name="partials acc")
    if with_bias and dtype == torch.bfloat16:  # COMPAT(triton 3.6) the interpreter truncates K/V + bias
        assert_close(kc, kc_ref, **TOLERANCES[dtype], name="k cache")
        assert_close(vc, vc_ref, **TOLERANCES[dtype], name="v cache")
    else:
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # the same K/V appended
    # merged, the partials are decode_attention's output
    full = attn_decode.decode_attention_ref(q, kc_ref.clone(), vc_ref.clone(), tables, lens_t, D**-0.5, k, v,
                                          slots, bias)
    assert_close(proj_residual.merge_partials_ref(acc, ml), full, **TOLERANCES[dtype], name="merged")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("R,H,S,D,N", [(1, 2, 3, 16, 97), (3, 3, 1, 8, 24), (9, 2, 5, 16, 7)], ids=lambda v: str(v))
def test_attn_merge_linear_residual_matches_reference(R, H, S, D, N, dtype, poison_empty):
    g = torch.Generator().manual_seed(R * 100 + S)
    acc = torch.randn(R, H, S, D, generator=g)
    m = 4 * torch.randn(R, H, S, generator=g)
    l = 1 + 10 * torch.rand(R, H, S, generator=g)
    m[0, 0, 0] = float("-inf")  # an empty split
    l[0, 0, 0], acc[0, 0, 0] = 0.0, 0.0
    if R > 2:  # a row without keys: every split empty, the merged output is zeros
        m[2], l[2], acc[2] = float("-inf"), 0.0, 0.0
    ml = torch.stack((m, l), dim=-1).contiguous()
    w = (torch.randn(N, H * D, generator=g) / (H * D) ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    res = torch.randn(R, N, generator=g).to(dtype)
    out = proj_residual.attn_merge_linear_residual(acc, ml, w, b, res)
    ref = proj_residual.attn_merge_linear_residual_ref(acc, ml, up(w), up(b), up(res))
    assert_close(out, ref, **tol(dtype), name="attn_merge_linear_residual")


# --------------------------------------------------------------------------------------------
# layernorm_head_argmax
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("R,C,V", [(1, 32, 97), (3, 48, 1), (8, 40, 150), (9, 24, 50)], ids=lambda v: str(v))
def test_head_argmax_matches_greedy_sampler(R, C, V, dtype, poison_empty):
    x, lnw, lnb, w, _ = linear_inputs(R, C, V, dtype, seed=R + C + V, bias=False)
    w = (w * 8).to(dtype)  # well separated maxima: no near-ties for rounding to flip
    tokens, status = head_argmax.layernorm_head_argmax(x, lnw, lnb, 1e-5, w)
    ref_tokens, ref_status = head_argmax.layernorm_head_argmax_ref(up(x), up(lnw), up(lnb), 1e-5, up(w))
    assert tokens.dtype == torch.int64 and status.dtype == torch.int32
    assert status.tolist() == ref_status.tolist() == [0] * R
    if dtype != torch.bfloat16:
        assert tokens.tolist() == ref_tokens.tolist()
    else:  # logits rounded to bf16 tie often: the pick must be a maximum within bf16 rounding
        logits = ln_linear.layernorm_linear_ref(up(x), up(lnw), up(lnb), 1e-5, up(w), None)  # [R, V]
        picked = logits.gather(1, tokens[:, None])[:, 0]
        best = logits.amax(dim=1)
        assert bool((picked >= best - 1e-2 * best.abs()).all()), (tokens.tolist(), ref_tokens.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_head_argmax_ties_go_to_the_lowest_id_across_programs(dtype):
    R, C, V = 2, 32, 97
    x, lnw, lnb, w, _ = linear_inputs(R, C, V, dtype, seed=11, bias=False)
    h = F.layer_norm(up(x), (C,), up(lnw), up(lnb), 1e-5)
    # rows 90 and 3 (different column blocks) and 40 all equal, and larger than any other logit
    top = (4 * h[0] / h[0].norm()).to(dtype)
    for col in (90, 40, 3):
        w[col] = top
    tokens, status = head_argmax.layernorm_head_argmax(x, lnw, lnb, 1e-5, w)
    ref_tokens, _ = head_argmax.layernorm_head_argmax_ref(x, lnw, lnb, 1e-5, w)
    assert tokens[0].item() == 3 == ref_tokens[0].item()
    assert status.tolist() == [0, 0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows, on purpose
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_head_argmax_flags_nan_and_all_minus_inf_rows(dtype):
    R, C, V = 3, 16, 40
    x, _, _, w, _ = linear_inputs(R, C, V, dtype, seed=2, bias=False)
    h = F.layer_norm(up(x), (C,), None, None, 1e-5)  # no affine: h is what the head multiplies
    w_nan = w.clone()
    w_nan[7] = float("nan")  # every row gets a NaN logit: status 1
    tokens, status = head_argmax.layernorm_head_argmax(x, None, None, 1e-5, w_nan)
    assert status.tolist() == [1, 1, 1] and tokens.tolist() == [-1, -1, -1]
    # every logit of row 0 is a sum of large negative products: -inf (in fp32 by overflow of the
    # sum, in fp16 by the rounding of the logits); the other rows' sums are order-dependent
    big = torch.finfo(dtype).max
    w_neg = (-big * torch.sign(h[0])).to(dtype).expand(V, C).contiguous()
    tokens, status = head_argmax.layernorm_head_argmax(x, None, None, 1e-5, w_neg)
    ref_tokens, ref_status = head_argmax.layernorm_head_argmax_ref(x, None, None, 1e-5, w_neg)
    assert status[0].item() == 2 == ref_status[0].item() and tokens[0].item() == -1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_head_argmax_flags_a_plus_inf_logit_of_one_row():
    R, C, V = 3, 16, 40
    dtype = torch.float16
    x, _, _, w, _ = linear_inputs(R, C, V, dtype, seed=2, bias=False)
    h = F.layer_norm(up(x), (C,), None, None, 1e-5)
    w_inf = w.clone()
    w_inf[30] = (8000 * torch.sign(h[1])).to(dtype)  # row 1's logit 30 rounds to +inf (> 65504)
    logits = up(h) @ up(w_inf).t()
    assert logits[1, 30] > 65504 and bool((logits[[0, 2]].abs() < 65504).all())  # the premise
    tokens, status = head_argmax.layernorm_head_argmax(x, None, None, 1e-5, w_inf)
    ref_tokens, ref_status = head_argmax.layernorm_head_argmax_ref(x, None, None, 1e-5, w_inf)
    assert status.tolist() == [0, 1, 0] == ref_status.tolist()
    assert tokens[1].item() == -1 and tokens.tolist() == ref_tokens.tolist()


# --------------------------------------------------------------------------------------------
# the model's GEMV decode step
# --------------------------------------------------------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from gptfast import GPT2, GPT2Config  # noqa: E402
from gptfast.kv_cache import AttnMetadata  # noqa: E402

# non-power-of-2 width (48) and 3 heads of 16; block size 4 so the context spans several blocks
MODEL_CONFIG = GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=3)
PROMPT = [5, 17, 3, 96, 0, 41, 8]


def _meta(lens, bs, decode, device="cpu"):
    """Metadata of a step for sequences stored contiguously from block 1 on (slot = bs + position)."""
    B = len(lens)
    max_blocks = -(-MODEL_CONFIG.n_positions // bs)
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    for b in range(B):
        tables[b] = torch.arange(max_blocks, dtype=torch.int32) + 1 + b * max_blocks
    if decode:
        pos = torch.tensor(lens) - 1
        slots = tables[torch.arange(B), pos // bs].long() * bs + pos % bs
        return AttnMetadata(slots, tables, torch.tensor(lens, dtype=torch.int32), None, 1, True)
    slots = torch.cat([tables[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs for b, n in enumerate(lens)])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return AttnMetadata(slots, tables, torch.tensor(lens, dtype=torch.int32), cu, max(lens), False)


def _prefilled_model(rows: int):
    """A tiny model whose cache holds `rows` copies of PROMPT (prefilled on the reference path),
    and the decode step's inputs: the next token of each row."""
    model = GPT2.from_config(MODEL_CONFIG, seed=0, block_size=4, num_kv_blocks=8 * 8 + 1)
    T = len(PROMPT)
    tokens = torch.tensor(PROMPT * rows)
    positions = torch.arange(T).repeat(rows)
    model.forward_paged(tokens, positions, _meta([T] * rows, 4, decode=False))
    step = (torch.tensor([11 + r for r in range(rows)]), torch.full((rows,), T), _meta([T + 1] * rows, 4, True))
    return model, step


class _KernelCounter(TorchDispatchMode):
    """Records the ATen ops that launch a kernel (not views, not allocations) and, through the
    Triton launch hook installed by `_count_kernels`, the Triton kernels."""

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        allocates_only = func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided)
        if not self.inside_triton and not is_view and not allocates_only:
            self.kernels.append(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _count_kernels(monkeypatch, fn):
    """The kernels `fn()` launches: every Triton launch (counted at `kernel[grid](...)`) and every
    kernel-launching ATen op outside them. Returns (fn's result, list of kernel names)."""
    counter = _KernelCounter()
    kernel_type = type(ln_linear._ln_linear_kernel)  # JITFunction, or the interpreter's
    real_getitem = kernel_type.__getitem__

    def counting_getitem(self, grid):
        launch = real_getitem(self, grid)

        def run(*args, **kwargs):
            counter.kernels.append(self.fn.__name__)
            counter.inside_triton += 1  # the interpreter's own tensor work is not a kernel
            try:
                return launch(*args, **kwargs)
            finally:
                counter.inside_triton -= 1

        return run

    monkeypatch.setattr(kernel_type, "__getitem__", counting_getitem)
    with counter:
        result = fn()
    return result, counter.kernels


def test_gemv_decode_step_is_5_kernels_per_block_plus_the_head(monkeypatch):
    """One batch-1 decode forward on the kernel path: 5 launches per block and 1 for the head (2
    for the greedy head), no other kernel. gpt2's 12 blocks: 61 (62 greedy) for the forward."""
    with backend("triton"):
        model, (tokens, positions, meta) = _prefilled_model(rows=1)
        cache_k = model.kv_cache.k.clone()
        logits, kernels = _count_kernels(monkeypatch, lambda: model.forward_paged(tokens, positions, meta))
        per_block = ["_ln_linear_kernel", "_decode_split_kernel", "_linear_residual_kernel", "_ln_linear_kernel",
                     "_linear_residual_kernel"]
        assert kernels == per_block * MODEL_CONFIG.n_layer + ["_ln_linear_kernel"], kernels
        assert logits.dtype == torch.float32  # written as fp32 by the head: no cast kernel
        model.kv_cache.k.copy_(cache_k)  # the same step again (the append is idempotent anyway)
        (tok, status), kernels = _count_kernels(monkeypatch,
                                                lambda: model.forward_paged_greedy(tokens, positions, meta))
        assert kernels == per_block * MODEL_CONFIG.n_layer + ["_ln_linear_kernel", "_argmax_reduce_kernel"], kernels
        assert tok.tolist() == [int(logits.argmax())] and status.tolist() == [0]


@pytest.mark.parametrize("rows", [1, 5])
def test_gemv_decode_step_matches_the_reference_path(rows, monkeypatch):
    """fp32: the GEMV step's logits within 1e-4 of the eager (reference) path's, the same K/V
    appended, and the greedy method's tokens the argmax of those logits on both paths."""
    model, (tokens, positions, meta) = _prefilled_model(rows)
    k0, v0 = model.kv_cache.k.clone(), model.kv_cache.v.clone()
    with backend("reference"):
        ref = model.forward_paged(tokens, positions, meta)
        ref_k, ref_v = model.kv_cache.k.clone(), model.kv_cache.v.clone()
        ref_tokens, ref_status = model.forward_paged_greedy(tokens, positions, meta)
    model.kv_cache.k.copy_(k0)
    model.kv_cache.v.copy_(v0)
    with backend("triton"):
        got = model.forward_paged(tokens, positions, meta)
        assert_close(got, ref, atol=1e-4, rtol=1e-4, name="GEMV step logits")
        assert_close(model.kv_cache.k, ref_k, atol=1e-5, rtol=1e-5, name="k cache")
        assert_close(model.kv_cache.v, ref_v, atol=1e-5, rtol=1e-5, name="v cache")
        got_tokens, got_status = model.forward_paged_greedy(tokens, positions, meta)
    assert ref_tokens.tolist() == got_tokens.tolist() == ref.argmax(dim=-1).tolist()
    assert ref_status.tolist() == got_status.tolist() == [0] * rows


def test_gemv_decode_kernels_compile_for_sm90_without_spills():
    """Every kernel variant of gpt2's small-batch decode step (bf16, batch 1 and 8) compiles for
    sm_90 with the wheel's ptxas, with no spill bytes (tests/sm90_compile.py, run without the
    interpreter in a subprocess: the kernels here are the interpreter's)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"no ptxas in the triton wheel ({ptxas})")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "sm90_compile.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 16, rows
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled


@pytest.mark.parametrize("module", [ln_linear_cases, proj_residual_cases, head_argmax_cases],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_benchmark_cases(module):
    """The GPU cases list without a GPU (quick is a subset); the CPU cases pass the runner's check,
    fast (interpreter) against reference, and each baseline computes the same thing."""
    from gptfast.bench.runner import default_check, run_and_capture

    quick, full = module.benchmark_cases("cuda", quick=True), module.benchmark_cases("cuda", quick=False)
    assert {c.label for c in quick} < {c.label for c in full}
    assert all(c.bytes_moved > 0 and c.flops > 0 and c.baselines for c in full)
    for case in module.benchmark_cases("cpu", quick=True):
        args = case.make_args()
        fast = run_and_capture(getattr(module, case.op), args)
        ref = run_and_capture(getattr(module, case.op + "_ref"), args)
        check = case.check or (lambda f, r, a: default_check(f, r, case.atol, case.rtol))
        assert check(fast, ref, args) is None, case.label
        for name, baseline in case.baselines.items():
            assert check(run_and_capture(baseline, args), ref, args) is None, f"{case.label} {name}"

"""Tests of ops/layernorm.py (add_layernorm, embed_layernorm) and ops/gelu.py (bias_gelu_ in Triton,
linear_gelu: cuBLASLt epilogue, or a GEMM + bias_gelu_ for one row).

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py) on small shapes in
fp32/fp16/bf16 (no tl.dot, so bf16 interprets; bias_gelu_ only in fp32/fp16, see
test_add_layernorm_rounds_once on the interpreter's bf16 casts); `gpu` tests cover real sizes,
the two CUDA paths of linear_gelu (with their kernel counts) and CUDA-graph capture. Kernel results
are compared with the eager reference computed in fp32 on upcast inputs, and the references
with float64 hand computations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.bench.op_cases import norm as norm_cases
from gptfast.ops import gelu, layernorm
from gptfast.ops.common import TOLERANCES, assert_close, compare, ref_name

# the interpreter (numpy >= 1.25) warns on every scalar it indexes with; it is Triton's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")



def upcast(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def strided_rows(t: torch.Tensor, pad: int, gen) -> torch.Tensor:
    """`t` [N, C] as a view with row stride C + pad (random data in the gaps)."""
    N, C = t.shape
    big = torch.randn(N, C + pad, generator=gen).to(t.dtype).to(t.device)
    big[:, pad // 2 : pad // 2 + C] = t
    return big[:, pad // 2 : pad // 2 + C]


def add_ln_inputs(N, C, dtype, device="cpu", seed=0, y_bias=True, weight=True, bias=True, pad=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3.0 + 2.0 * torch.randn(N, C, generator=gen)).to(dtype).to(device)  # off-centre rows: the mean matters
    y = torch.randn(N, C, generator=gen).to(dtype).to(device)
    if pad:  # strided on the device itself (.to(device) would copy a view with gaps contiguous)
        x, y = strided_rows(x, pad, gen), strided_rows(y, pad + 3, gen)
    yb = (0.5 * torch.randn(C, generator=gen)).to(dtype) if y_bias else None
    w = (1 + 0.3 * torch.randn(C, generator=gen)).to(dtype) if weight else None
    b = (0.3 * torch.randn(C, generator=gen)).to(dtype) if bias else None
    return tuple(t.to(device) if t is not None else None for t in (x, y, yb, w, b))


def embed_inputs(N, C, V, P, dtype, device="cpu", seed=0, affine=True, pad=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (N,), generator=gen)
    positions = torch.randint(0, P, (N,), generator=gen)
    wte = torch.randn(V, C, generator=gen).to(dtype).to(device)
    wpe = (0.5 + torch.randn(P, C, generator=gen)).to(dtype).to(device)
    if pad:
        wte, wpe = strided_rows(wte, pad, gen), strided_rows(wpe, pad + 1, gen)
    w = (1 + 0.3 * torch.randn(C, generator=gen)).to(dtype) if affine else None
    b = (0.3 * torch.randn(C, generator=gen)).to(dtype) if affine else None
    return tuple(t.to(device) if t is not None else None for t in (tokens, positions, wte, wpe, w, b))


def check_pair(out, expected, dtype, name):
    """out = (s, h) from a kernel against the fp32 reference (s, h)."""
    for label, got, want in zip(("s", "h"), out, expected):
        assert got.dtype == dtype and got.is_contiguous(), f"{name} {label}: {got.dtype} {got.stride()}"
        assert not torch.isnan(got).any(), f"{name} {label}: NaN (an unwritten element?)"
        assert_close(got, want, **TOLERANCES[dtype], name=f"{name} {label}")


# --------------------------------------------------------------------------------------------
# the references against float64 hand computations
# --------------------------------------------------------------------------------------------


def layer_norm_by_hand(s, w, b, eps):
    """s [N, C] float64, row by row."""
    out = torch.empty_like(s)
    C = s.shape[1]
    for i in range(s.shape[0]):
        mean = sum(s[i].tolist()) / C
        var = sum((v - mean) ** 2 for v in s[i].tolist()) / C
        out[i] = (s[i] - mean) / math.sqrt(var + eps)
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


def test_add_layernorm_ref_by_hand():
    x, y, yb, w, b = add_ln_inputs(4, 13, torch.float64, seed=1)
    s, h = layernorm.add_layernorm_ref(x, y, yb, w, b, 0.01)
    expected_s = torch.tensor([[x[i, j].item() + y[i, j].item() + yb[j].item() for j in range(13)] for i in range(4)],
                              dtype=torch.float64)
    assert_close(s, expected_s, atol=1e-12, rtol=1e-12, name="s")
    assert_close(h, layer_norm_by_hand(expected_s, w, b, 0.01), atol=1e-10, rtol=1e-10, name="h")
    # no bias term, no affine terms
    s, h = layernorm.add_layernorm_ref(x, y, None, None, None, 1e-5)
    assert_close(h, layer_norm_by_hand(x + y, None, None, 1e-5), atol=1e-10, rtol=1e-10, name="h plain")


def test_embed_layernorm_ref_by_hand():
    tokens, positions, wte, wpe, w, b = embed_inputs(6, 11, 9, 5, torch.float64, seed=2)
    s, h = layernorm.embed_layernorm_ref(tokens, positions, wte, wpe, w, b, 1e-5)
    expected_s = torch.stack([wte[t] + wpe[p] for t, p in zip(tokens.tolist(), positions.tolist())])
    assert torch.equal(s, expected_s)
    assert_close(h, layer_norm_by_hand(expected_s, w, b, 1e-5), atol=1e-10, rtol=1e-10, name="h")


def test_linear_gelu_ref_by_hand():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    bias = torch.randn(9, generator=gen, dtype=torch.float64)
    u = x @ weight.T + bias
    expected = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    assert_close(gelu.linear_gelu_ref(x, weight, bias), expected, atol=1e-12, rtol=1e-12)
    u = x @ weight.T
    expected = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    assert_close(gelu.linear_gelu_ref(x, weight, None), expected, atol=1e-12, rtol=1e-12, name="no bias")


# --------------------------------------------------------------------------------------------
# add_layernorm
# --------------------------------------------------------------------------------------------

ADD_CASES = {
    # id: (N, C, eps); BLOCK_R rows per program: C=1 -> 16, C=3 -> 16, C=96/100 -> 4, C=768 -> 1
    "n1-c1": (1, 1, 1e-5),
    "n3-c3": (3, 3, 1e-5),
    "n33-c96": (33, 96, 1e-5),  # 9 programs of 4 rows, the last one partial
    "n7-c100-eps0.1": (7, 100, 0.1),
    "n17-c37": (17, 37, 1e-5),
    "n5-c768": (5, 768, 1e-5),
    "n2-c1600": (2, 1600, 1e-5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ADD_CASES.values(), ids=ADD_CASES.keys())
def test_add_layernorm(case, dtype, poison_empty):
    N, C, eps = case
    args = (*add_ln_inputs(N, C, dtype, seed=N * 31 + C), eps)
    check_pair(layernorm.add_layernorm(*args), layernorm.add_layernorm_ref(*upcast(args)), dtype,
               f"add_layernorm N={N} C={C}")


TERMS = {  # id: (y_bias, weight, bias)
    "no-ybias": (False, True, True),
    "no-affine": (True, False, False),
    "weight-only": (True, True, False),
    "bias-only": (False, False, True),
}


@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
def test_add_layernorm_optional_terms(terms, poison_empty):
    yb, w, b = terms
    args = (*add_ln_inputs(9, 100, torch.float16, seed=5, y_bias=yb, weight=w, bias=b), 1e-5)
    assert [a is None for a in args[2:5]] == [not yb, not w, not b]
    check_pair(layernorm.add_layernorm(*args), layernorm.add_layernorm_ref(*upcast(args)), torch.float16,
               "add_layernorm")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_layernorm_strided_rows(dtype, poison_empty):
    # x, y as views with their own row strides (e.g. slices of wider buffers)
    args = (*add_ln_inputs(11, 96, dtype, seed=6, pad=7), 1e-5)
    assert args[0].stride(0) == 103 and args[1].stride(0) == 106
    check_pair(layernorm.add_layernorm(*args), layernorm.add_layernorm_ref(*upcast(args)), dtype,
               "strided add_layernorm")


def test_add_layernorm_rounds_once():
    # s is the fp32 sum rounded once: bit-identical to rounding the exact fp32 sum. fp16 only
    # here: COMPAT(triton 3.6) the interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest
    # even), so interpreted bf16 is up to 1 ulp low; test_add_layernorm_gpu checks bf16.
    dtype = torch.float16
    x, y, yb, w, b = add_ln_inputs(13, 100, dtype, seed=7)
    s, _ = layernorm.add_layernorm(x, y, yb, w, b, 1e-5)
    assert torch.equal(s, (x.float() + y.float() + yb.float()).to(dtype))
    s, _ = layernorm.add_layernorm(x, y, None, w, b, 1e-5)
    assert torch.equal(s, (x.float() + y.float()).to(dtype))


def test_add_layernorm_normalises_the_rounded_sum():
    # fp16 around 2048 has a spacing of 2: 2048 + y (0 <= y < 0.9) rounds to 2048 in every lane,
    # so the rounded row is constant and h = bias, as eager fp16 computes; normalising the
    # unrounded sum would instead give the normalised y
    gen = torch.Generator().manual_seed(8)
    C = 50
    x = torch.full((3, C), 2048.0, dtype=torch.float16)
    y = (0.9 * torch.rand(3, C, generator=gen)).to(torch.float16)
    w = (1 + torch.rand(C, generator=gen)).to(torch.float16)
    b = torch.randn(C, generator=gen).to(torch.float16)
    s, h = layernorm.add_layernorm(x, y, None, w, b, 1e-5)
    assert torch.equal(s, x)
    assert torch.equal(h, b.expand(3, C))
    s_ref, h_ref = layernorm.add_layernorm_ref(x, y, None, w, b, 1e-5)  # eager in fp16
    assert torch.equal(s_ref, s) and torch.equal(h_ref, h)


def test_add_layernorm_empty():
    x, y, yb, w, b = add_ln_inputs(0, 96, torch.float32)
    s, h = layernorm.add_layernorm(x, y, yb, w, b, 1e-5)
    assert s.shape == h.shape == (0, 96)


def test_add_layernorm_rejects_bad_inputs():
    x, y, yb, w, b = add_ln_inputs(4, 16, torch.float32, seed=9)
    good = (x, y, yb, w, b, 1e-5)
    bad = {
        "y dtype": (x, y.half(), yb, w, b, 1e-5),
        "weight dtype": (x, y, yb, w.half(), b, 1e-5),
        "x dtype must be one of": (x.double(), y.double(), yb, w, b, 1e-5),
        "y must have x's shape": (x, y[:3], yb, w, b, 1e-5),
        r"y_bias must be 1-D \[C=16\]": (x, y, yb[:15], w, b, 1e-5),
        r"bias must be 1-D \[C=16\], got shape \(4, 16\)": (x, y, yb, w, y, 1e-5),
        "x must be 2-D": (x[None], y, yb, w, b, 1e-5),
        "last dimension must be contiguous": (x.t().contiguous().t(), y, yb, w, b, 1e-5),
        "weight must be contiguous": (x, y, yb, torch.randn(32)[::2], b, 1e-5),
        "eps": (*good[:5], float("nan")),
        "C \\(the last dimension\\)": (torch.randn(1, 20000), torch.randn(1, 20000), None, None, None, 1e-5),
        "one device; x is on cpu, y on meta": (x, y.to("meta"), yb, w, b, 1e-5),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            layernorm.add_layernorm(*args)


# --------------------------------------------------------------------------------------------
# embed_layernorm
# --------------------------------------------------------------------------------------------

EMBED_CASES = {
    # id: (N, C, V, P)
    "n1-c1-v1-p1": (1, 1, 1, 1),
    "n6-c3-v10-p4": (6, 3, 10, 4),
    "n33-c96-v50-p40": (33, 96, 50, 40),  # repeated ids
    "n9-c100-v7-p12": (9, 100, 7, 12),
    "n4-c768-v30-p16": (4, 768, 30, 16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", EMBED_CASES.values(), ids=EMBED_CASES.keys())
def test_embed_layernorm(case, dtype, poison_empty):
    N, C, V, P = case
    args = (*embed_inputs(N, C, V, P, dtype, seed=N + C + V), 1e-5)
    check_pair(layernorm.embed_layernorm(*args), layernorm.embed_layernorm_ref(*upcast(args)), dtype,
               f"embed_layernorm N={N} C={C}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_embed_layernorm_strided_tables_no_affine(dtype, poison_empty):
    args = (*embed_inputs(10, 96, 20, 8, dtype, seed=11, affine=False, pad=5), 1e-5)
    assert args[2].stride(0) == 101 and args[3].stride(0) == 102 and args[4] is None
    # ids as strided views too (every other element of a longer vector)
    args = (args[0].repeat_interleave(2)[::2], args[1].repeat_interleave(2)[::2], *args[2:])
    assert args[0].stride(0) == 2
    check_pair(layernorm.embed_layernorm(*args), layernorm.embed_layernorm_ref(*upcast(args)), dtype, "strided embed")


def test_embed_layernorm_matches_eager_modules():
    # what the model does without the fused op: nn.Embedding x2, add, nn.LayerNorm
    torch.manual_seed(12)
    wte, wpe, ln = torch.nn.Embedding(40, 24), torch.nn.Embedding(16, 24), torch.nn.LayerNorm(24, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_(1, 0.2)
        ln.bias.normal_(0, 0.2)
        tokens = torch.randint(0, 40, (13,))
        positions = torch.arange(13) + 2
        s_eager = wte(tokens) + wpe(positions)
        expected = (s_eager, ln(s_eager))
        out = layernorm.embed_layernorm(tokens, positions, wte.weight, wpe.weight, ln.weight, ln.bias, 1e-5)
    check_pair(out, expected, torch.float32, "embed_layernorm vs modules")


def test_embed_layernorm_clamps_out_of_range_ids(poison_empty):
    _, _, wte, wpe, w, b = embed_inputs(5, 16, 7, 4, torch.float32, seed=13)
    bad_tokens = torch.tensor([-3, 0, 6, 7, 100])
    bad_positions = torch.tensor([4, -1, 2, 3, 50])
    out = layernorm.embed_layernorm(bad_tokens, bad_positions, wte, wpe, w, b, 1e-5)
    expected = layernorm.embed_layernorm_ref(bad_tokens.clamp(0, 6), bad_positions.clamp(0, 3), wte, wpe, w, b, 1e-5)
    check_pair(out, expected, torch.float32, "clamped ids")
    with pytest.raises(IndexError):
        layernorm.embed_layernorm_ref(bad_tokens, bad_positions, wte, wpe, w, b, 1e-5)


def test_embed_layernorm_empty():
    tokens, positions, wte, wpe, w, b = embed_inputs(0, 8, 5, 3, torch.float16)
    s, h = layernorm.embed_layernorm(tokens, positions, wte, wpe, w, b, 1e-5)
    assert s.shape == h.shape == (0, 8) and s.dtype == torch.float16


def test_embed_layernorm_rejects_bad_inputs():
    tokens, positions, wte, wpe, w, b = embed_inputs(4, 8, 5, 3, torch.float32, seed=14)
    bad = {
        "tokens must be a 1-D int64": (tokens.int(), positions, wte, wpe, w, b, 1e-5),
        "positions must be a 1-D int64": (tokens, positions[None], wte, wpe, w, b, 1e-5),
        "positions must have tokens' shape": (tokens, positions[:3], wte, wpe, w, b, 1e-5),
        "wpe must be": (tokens, positions, wte, wpe[:, :7], w, b, 1e-5),
        "wpe dtype": (tokens, positions, wte, wpe.half(), w, b, 1e-5),
        "wte's last dimension": (tokens, positions, wte.t().contiguous().t(), wpe, w, b, 1e-5),
        r"weight must be 1-D \[C=8\]": (tokens, positions, wte, wpe, w[:4], b, 1e-5),
        "at least one row": (tokens, positions, wte[:0], wpe, w, b, 1e-5),
        "eps": (tokens, positions, wte, wpe, w, b, -1.0),
        "one device; tokens is on cpu, positions on meta": (tokens, positions.to("meta"), wte, wpe, w, b, 1e-5),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            layernorm.embed_layernorm(*args)


# --------------------------------------------------------------------------------------------
# linear_gelu (CPU: the launcher takes the reference path)
# --------------------------------------------------------------------------------------------


def linear_inputs(N, K, M, dtype, device="cpu", seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=gen).to(dtype)
    weight = (1.5 / math.sqrt(K) * torch.randn(M, K, generator=gen)).to(dtype)  # pre-activations ~ N(0, 1.5^2)
    b = (0.3 * torch.randn(M, generator=gen)).to(dtype) if bias else None
    return tuple(t.to(device) if t is not None else None for t in (x, weight, b))


def gelu_tanh_f64(x, weight, bias):
    u = x.double() @ weight.double().T
    if bias is not None:
        u = u + bias.double()
    return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_linear_gelu_cpu(dtype, bias):
    x, weight, b = linear_inputs(6, 40, 24, dtype, seed=15, bias=bias)
    out = gelu.linear_gelu(x, weight, b)
    assert out.dtype == dtype and out.shape == (6, 24)
    assert_close(out, gelu_tanh_f64(x, weight, b), **TOLERANCES[dtype], name="linear_gelu")
    assert torch.equal(out, gelu.linear_gelu_ref(x, weight, b))  # the CPU path is the reference
    assert gelu.linear_gelu(x[:0], weight, b).shape == (0, 24)


def test_addmm_activation_is_erf_gelu_on_cpu():
    # Why linear_gelu's CPU path does not call torch._addmm_activation: there it applies the
    # exact (erf) GELU, not GPT-2's tanh approximation (the two differ by up to ~5e-4). If this
    # starts failing, PyTorch changed the CPU semantics and the CPU path could use it.
    x, weight, b = linear_inputs(64, 32, 48, torch.float64, seed=16)
    out = torch._addmm_activation(b, x, weight.t(), use_gelu=True)
    u = F.linear(x, weight, b)
    assert_close(out, F.gelu(u), atol=1e-12, rtol=1e-12, name="erf gelu")
    assert compare(out, F.gelu(u, approximate="tanh"), atol=1e-5, rtol=0) is not None


def test_linear_gelu_rejects_bad_inputs():
    x, weight, b = linear_inputs(3, 8, 5, torch.float32, seed=17)
    bad = {
        r"weight must be 2-D \[M, K=8\]": (x, weight[:, :7], b),
        "weight dtype": (x, weight.half(), b),
        r"bias must be None or 1-D \[M=5\]": (x, weight, b[:4]),
        "bias dtype": (x, weight, b.double()),
        "x must be a 2-D": (x[0], weight, b),
        "one device; x is on cpu, weight on meta": (x, weight.to("meta"), b),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            gelu.linear_gelu(*args)


def test_linear_gelu_cpu_one_row_is_the_reference():
    # the CUDA branch for one row (or K = 1, M = 1) must not leak into the CPU path
    for N, K, M in ((1, 40, 24), (3, 1, 24), (3, 40, 1)):
        x, weight, b = linear_inputs(N, K, M, torch.float16, seed=40 + K + M)
        assert torch.equal(gelu.linear_gelu(x, weight, b), gelu.linear_gelu_ref(x, weight, b)), (N, K, M)


# --------------------------------------------------------------------------------------------
# bias_gelu_ (in place) and the 1-row linear_gelu path built on it
# --------------------------------------------------------------------------------------------


def bias_gelu_inputs(N, M, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = (1.5 * torch.randn(N, M, generator=gen)).to(dtype).to(device)  # GELU's curved range, both signs
    bias = (0.5 * torch.randn(M, generator=gen)).to(dtype).to(device)
    return y, bias


def test_bias_gelu_ref_by_hand():
    # fp32 (the reference computes in fp32 whatever the dtype) against float64 by hand
    y, bias = bias_gelu_inputs(3, 7, torch.float32, seed=30)
    u = [[y[i, j].item() + bias[j].item() for j in range(7)] for i in range(3)]
    expected = torch.tensor([[0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in row]
                             for row in u], dtype=torch.float64)
    out = gelu.bias_gelu_ref_(y, bias)
    assert out is y
    assert_close(y, expected, atol=1e-6, rtol=1e-6, name="bias_gelu_ref_")
    # fp16: computed in fp32, rounded once
    y16, b16 = bias_gelu_inputs(4, 33, torch.float16, seed=31)
    want = F.gelu(y16.float() + b16.float(), approximate="tanh").to(torch.float16)
    assert torch.equal(gelu.bias_gelu_ref_(y16, b16), want)


BIAS_GELU_SHAPES = [(n, m) for n in (1, 2, 5) for m in (1, 3, 100, 3072)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape", BIAS_GELU_SHAPES, ids=[f"n{n}-m{m}" for n, m in BIAS_GELU_SHAPES])
def test_bias_gelu(shape, dtype):
    N, M = shape
    y, bias = bias_gelu_inputs(N, M, dtype, seed=N * 7 + M)
    expected = gelu.bias_gelu_ref_(*upcast((y.clone(), bias)))  # fp32
    ptr = y.data_ptr()
    out = gelu.bias_gelu_(y, bias)
    assert out is y and y.data_ptr() == ptr and y.dtype == dtype  # in place
    assert_close(y, expected, **TOLERANCES[dtype], name=f"bias_gelu_ N={N} M={M}")


def gelu_tanh_of_sum_f64(y, bias):
    u = y.double() + bias.double()
    return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))


def test_bias_gelu_rounds_once():
    # fp16: the fp32 result rounded once, so (nearly) the correctly rounded float64 GELU, while
    # rounding y + bias to fp16 before the GELU would differ in a large fraction of elements.
    # (The kernel's u * sigmoid(2z) keeps fp32 accuracy for negative u, where eager's
    # 0.5 u (1 + tanh z) cancels: eager fp16 misses the correctly rounded value ~0.5% of the time.)
    y, bias = bias_gelu_inputs(4, 3072, torch.float16, seed=32)
    truth = gelu_tanh_of_sum_f64(y, bias)
    twice = F.gelu((y + bias).float(), approximate="tanh").to(torch.float16)
    got = gelu.bias_gelu_(y.clone(), bias)
    assert (got != truth.half()).float().mean().item() < 1e-3, "more than 0.1% of elements not correctly rounded"
    assert (twice != truth.half()).float().mean().item() > 0.05  # the check can tell the two apart
    got32 = gelu.bias_gelu_(y.float(), bias.float())
    rel = ((got32.double() - truth).abs() / truth.abs().clamp_min(1e-30)).max().item()
    assert rel < 1e-5, f"fp32 max relative error {rel:.2e} vs float64"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_bias_gelu_strided_rows_writes_only_its_window(dtype):
    # y as a window of a NaN-filled buffer (row stride M + 9): the window is rewritten, the rest
    # of the buffer must still be NaN afterwards
    N, M = 5, 100
    y0, bias = bias_gelu_inputs(N, M, dtype, seed=33)
    buf = torch.full((N + 1, M + 9), float("nan"), dtype=dtype)
    y = buf[:N, 4 : 4 + M]
    y.copy_(y0)
    assert y.stride() == (M + 9, 1)
    out = gelu.bias_gelu_(y, bias)
    assert out is y
    assert_close(y, gelu.bias_gelu_ref_(*upcast((y0, bias))), **TOLERANCES[dtype], name="strided bias_gelu_")
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:N, 4 : 4 + M] = False
    assert torch.isnan(buf[outside]).all(), "bias_gelu_ wrote outside y"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_bias_gelu_special_values(dtype):  # (the interpreter's numpy warns on the inf it computes)
    # NaN stays NaN, +inf stays inf, -inf gives NaN (0.5 * -inf * 0), far-negative gives -0,
    # far-positive gives itself: as eager computes them
    big = 6e4 if dtype == torch.float16 else 1e30
    row = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big, 0.0, -12.0, 12.0, -3.0, 0.5])
    y = torch.stack([row, row.flip(0)]).to(dtype)
    bias = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.0, -0.4, 0.5, 1.0, -1.0, 0.25]).to(dtype)
    expected = gelu.bias_gelu_ref_(*upcast((y.clone(), bias)))
    assert torch.isnan(expected).sum() == 4 and torch.isinf(expected).sum() == 2
    got = gelu.bias_gelu_(y.clone(), bias)
    assert_close(got, expected, **TOLERANCES[dtype], name="special values")
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


def test_bias_gelu_empty():
    for shape in ((0, 8), (3, 0)):
        y = torch.randn(*shape).half()
        assert gelu.bias_gelu_(y, torch.randn(shape[1]).half()) is y


def test_bias_gelu_rejects_bad_inputs():
    y, bias = bias_gelu_inputs(3, 8, torch.float32, seed=34)
    bad = {
        r"y must be 2-D \[rows, C\]": (y[0], bias),
        "y dtype must be one of": (y.double(), bias.double()),
        "y's last dimension must be contiguous": (torch.randn(8, 3).t(), bias),
        r"y's rows overlap \(row stride 0 < M=8\)": (y[:1].expand(3, 8), bias),
        r"bias must be 1-D \[C=8\], got shape \(7,\)": (y, bias[:7]),
        "bias dtype torch.float16 differs": (y, bias.half()),
        "bias must be contiguous": (y, torch.randn(16)[::2]),
        "one device; y is on cpu, bias on meta": (y, bias.to("meta")),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            gelu.bias_gelu_(*args)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got NoneType"):
        gelu.bias_gelu_(y, None)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        gelu.bias_gelu_(y.tolist(), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("sizes", [(1, 768, 3072), (1, 40, 24), (4, 1, 24), (3, 40, 1)],
                         ids=lambda s: "n%d-k%d-m%d" % s)
def test_linear_gelu_two_kernels(sizes, dtype):
    # the CUDA path where cuBLASLt's epilogue is not taken (any of N, K, M is 1), run here with
    # an interpreted bias_gelu_: a bias-less GEMM rounded to the dtype, then bias + GELU
    x, weight, b = linear_inputs(*sizes, dtype, seed=sum(sizes))
    out = gelu._linear_gelu_two_kernels(x, weight, b)
    assert out.dtype == dtype and out.shape == (sizes[0], sizes[2])
    assert_close(out, gelu_tanh_f64(x, weight, b), **TOLERANCES[dtype], name=f"mm + bias_gelu_ {sizes}")
    assert_close(out, gelu.linear_gelu_ref(*upcast((x, weight, b))), **TOLERANCES[dtype], name="vs reference")


# --------------------------------------------------------------------------------------------
# dispatch and benchmark cases
# --------------------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    assert ops.add_layernorm.fast is layernorm.add_layernorm and ops.add_layernorm.ref is layernorm.add_layernorm_ref
    assert ops.embed_layernorm.fast is layernorm.embed_layernorm
    assert ops.embed_layernorm.ref is layernorm.embed_layernorm_ref
    assert ops.linear_gelu.fast is gelu.linear_gelu and ops.linear_gelu.ref is gelu.linear_gelu_ref
    assert ops.bias_gelu_.fast is gelu.bias_gelu_ and ops.bias_gelu_.ref is gelu.bias_gelu_ref_
    args = (*add_ln_inputs(5, 24, torch.float16, seed=18), 1e-5)
    eager = layernorm.add_layernorm_ref(*args)
    kernel = layernorm.add_layernorm(*args)
    assert not torch.equal(eager[0], kernel[0])  # double vs single rounding: the paths are told apart
    got = ops.add_layernorm(*args)  # CPU tensors -> the reference
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
    with ops.backend("triton"):
        got = ops.add_layernorm(*args)  # forced -> the kernel (interpreted)
    assert torch.equal(got[0], kernel[0]) and torch.equal(got[1], kernel[1])


def fresh(args):
    """A copy of each tensor argument: bias_gelu_ writes into its first, so fast and reference
    each get their own."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def test_benchmark_cases_cpu():
    cases = norm_cases.benchmark_cases("cpu", quick=True)
    assert {c.op for c in cases} == {"add_layernorm", "embed_layernorm", "linear_gelu", "bias_gelu_"}
    for case in cases:
        args = case.make_args()
        fast, ref = getattr(norm_cases, case.op), getattr(norm_cases, ref_name(case.op))
        expected = ref(*fresh(args))
        got = fast(*fresh(args))
        for i, (a, e) in enumerate(zip(*(((o,) if isinstance(o, torch.Tensor) else o) for o in (got, expected)))):
            assert_close(a, e, atol=case.atol, rtol=case.rtol, name=f"{case.label} output {i}")
        for name, baseline in case.baselines.items():
            assert isinstance(baseline(*fresh(args)), torch.Tensor), name
        assert case.bytes_moved > 0
    gelu = next(c for c in cases if c.op == "bias_gelu_")
    assert gelu.bytes_moved == (2 * 3 * 100 + 100) * 4


def test_benchmark_cases_cuda_listing_needs_no_gpu():
    cases = norm_cases.benchmark_cases("cuda", quick=True)
    labels = [f"{c.op} {c.label}" for c in cases]
    assert "add_layernorm N=256 C=1600 bfloat16" in labels and "linear_gelu N=1 K=768 M=3072 bfloat16" in labels
    gelu = {c.params["N"]: c for c in cases if c.op == "linear_gelu"}
    assert gelu[256].flops == 2 * 256 * 768 * 3072
    assert gelu[1].bytes_moved == (768 + 3072 * 768 + 3072 + 3072) * 2
    assert "2-row pad" in gelu[1].baselines and "2-row pad" not in gelu[64].baselines
    assert "_addmm_activation" in gelu[1].baselines and "_addmm_activation" not in gelu[64].baselines
    assert "bias_gelu_ N=1 M=3072 bfloat16" in labels and "bias_gelu_ N=256 M=3072 bfloat16" in labels
    assert len(norm_cases.benchmark_cases("cuda", quick=False)) > len(cases)


# --------------------------------------------------------------------------------------------
# GPU: real sizes, the cuBLASLt path, CUDA graphs
# --------------------------------------------------------------------------------------------

GPU_ADD_CASES = {
    # id: (N, C, row padding of x and y)
    "n1-c768": (1, 768, 0),
    "n256-c768-strided": (256, 768, 768 * 2),  # x, y as slices of [N, 3C]-like buffers
    "n4096-c768": (4096, 768, 0),
    "n64-c1600": (64, 1600, 0),
    "n33-c1000-strided": (33, 1000, 24),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", GPU_ADD_CASES.values(), ids=GPU_ADD_CASES.keys())
def test_add_layernorm_gpu(case, dtype, poison_empty):
    N, C, pad = case
    args = (*add_ln_inputs(N, C, dtype, "cuda", seed=N + C, pad=pad), 1e-5)
    assert args[0].stride(0) == C + pad and args[1].stride(0) == (C + pad + 3 if pad else C)
    check_pair(layernorm.add_layernorm(*args), layernorm.add_layernorm_ref(*upcast(args)), dtype,
               f"add_layernorm N={N} C={C}")
    if dtype != torch.float32:
        s, _ = layernorm.add_layernorm(*args)
        x, y, yb = args[:3]
        assert torch.equal(s, (x.float() + y.float() + yb.float()).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("N", [1, 256, 2048])
def test_embed_layernorm_gpu(N, dtype, poison_empty):
    args = (*embed_inputs(N, 768, 50257, 1024, dtype, "cuda", seed=N), 1e-5)
    check_pair(layernorm.embed_layernorm(*args), layernorm.embed_layernorm_ref(*upcast(args)), dtype,
               f"embed_layernorm N={N}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("N", [1, 64, 256])
def test_linear_gelu_gpu(N, dtype):
    # N=1 takes mm + bias_gelu_, 64 and 256 the GELU_BIAS epilogue
    x, weight, b = linear_inputs(N, 768, 3072, dtype, "cuda", seed=N)
    out = gelu.linear_gelu(x, weight, b)
    assert out.dtype == dtype and out.shape == (N, 3072)
    assert_close(out, gelu.linear_gelu_ref(*upcast((x, weight, b))), **TOLERANCES[dtype], name=f"linear_gelu N={N}")
    assert_close(gelu.linear_gelu(x, weight, None), gelu.linear_gelu_ref(*upcast((x, weight, None))),
                 **TOLERANCES[dtype], name=f"linear_gelu N={N} no bias")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2, 64])
def test_linear_gelu_gpu_is_the_tanh_gelu(N):
    # fp32 (no TF32) is accurate enough to tell the two GELUs apart (they differ by up to 4.7e-4):
    # the cuBLASLt epilogue (N >= 2) and mm + bias_gelu_ (N = 1) must both be the tanh form
    x, weight, b = linear_inputs(N, 768, 3072, torch.float32, "cuda", seed=100 + N)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = gelu.linear_gelu(x, weight, b).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    x, weight, b = x.cpu(), weight.cpu(), b.cpu()
    err_tanh = (out.double() - gelu_tanh_f64(x, weight, b)).abs().max().item()
    err_erf = (out.double() - F.gelu(x.double() @ weight.double().T + b.double())).abs().max().item()
    # fp32 accumulation error is ~1e-6; an approximate tanh in the epilogue would show as ~1e-4
    assert err_tanh < 3e-5 and err_erf > 2e-4, f"max abs error vs tanh GELU {err_tanh:.2e}, vs erf GELU {err_erf:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 3072), (2, 3072), (7, 1000), (4096, 3072), (3, 1)], ids=lambda s: "n%d-m%d" % s)
def test_bias_gelu_gpu(shape, dtype):
    N, M = shape
    y, bias = bias_gelu_inputs(N, M, dtype, "cuda", seed=N + M)
    expected = gelu.bias_gelu_ref_(*upcast((y.clone(), bias)))
    truth = gelu_tanh_of_sum_f64(y, bias)
    assert gelu.bias_gelu_(y, bias) is y
    assert_close(y, expected, **TOLERANCES[dtype], name=f"bias_gelu_ N={N} M={M}")
    if dtype != torch.float32:  # rounded once: nearly always the correctly rounded value
        assert (y != truth.to(dtype)).float().mean().item() < 1e-3
    else:
        # GPU exp/div are approximate (a few ulps, more for large |exponent|)
        rel = ((y.double() - truth).abs() / truth.abs().clamp_min(1e-30)).max().item()
        assert rel < 5e-5, f"fp32 max relative error {rel:.2e} vs float64"


def device_kernel_names(fn) -> list[str]:
    """Names of the device kernels (and copies, as "copy") one call of `fn` runs, after a warm-up
    call (Triton compile, cuBLAS handles)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert names, f"the profiler recorded no CUDA kernel (torch {torch.__version__}: is CUPTI available?)"
    return ["copy" if n.lower().startswith(("memcpy", "memset")) else n for n in names]


@pytest.mark.gpu
def test_linear_gelu_gpu_kernel_counts():
    # one row: the bias-less GEMM plus _bias_gelu_kernel (PyTorch's own fallback adds a bias copy
    # and a gelu_ kernel to the GEMM); two rows: the cuBLASLt GEMM with its GELU_BIAS epilogue.
    # NOTE: upper bounds for cuBLAS: it may split K and add a reduce kernel to any GEMM.
    x, weight, b = linear_inputs(2, 768, 3072, torch.bfloat16, "cuda", seed=50)
    x1 = x[:1]
    gemm = device_kernel_names(lambda: torch.mm(x1, weight.t()))
    one_row = device_kernel_names(lambda: gelu.linear_gelu(x1, weight, b))
    old = device_kernel_names(lambda: torch._addmm_activation(b, x1, weight.t(), use_gelu=True))
    two_rows = device_kernel_names(lambda: gelu.linear_gelu(x, weight, b))
    counts = f"GEMM alone {gemm}\n1 row {one_row}\nPyTorch's 1-row fallback {old}\n2 rows {two_rows}"
    assert sum("_bias_gelu_kernel" in n for n in one_row) == 1, counts
    assert len(one_row) == len(gemm) + 1, counts  # the same GEMM, then the epilogue kernel
    assert 1 <= len(gemm) <= 2, "cuBLAS ran the 1-row GEMM as more than a GEMM and a reduce\n" + counts
    assert len(one_row) <= len(old), counts
    assert 1 <= len(two_rows) <= 2, counts


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_linear_gelu_gpu_one_row_in_cuda_graph(dtype):
    # batch-1 decode's use: the mm + bias_gelu_ path captured once, replayed on new inputs
    x, weight, b = linear_inputs(1, 768, 3072, dtype, "cuda", seed=51)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gelu.linear_gelu(x, weight, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gelu.linear_gelu(x, weight, b)
    for seed in (52, 53):
        x.copy_(torch.randn(1, 768, generator=torch.Generator().manual_seed(seed)).to(dtype))
        graph.replay()
        assert_close(out, gelu.linear_gelu_ref(*upcast((x, weight, b))), **TOLERANCES[dtype], name=f"replay {seed}")


@pytest.mark.gpu
def test_benchmark_cases_gpu():
    # what `gptfast bench --suite ops --quick` checks, plus the baselines that compute the op
    for case in norm_cases.benchmark_cases("cuda", quick=True):
        args = case.make_args()
        got = getattr(norm_cases, case.op)(*fresh(args))
        expected = getattr(norm_cases, ref_name(case.op))(*fresh(args))
        for a, e in zip(*(((o,) if isinstance(o, torch.Tensor) else o) for o in (got, expected))):
            assert_close(a, e, atol=case.atol, rtol=case.rtol, name=case.label)
        for name in ("2-row pad", "_addmm_activation", "add + gelu"):
            if name in case.baselines:
                assert_close(case.baselines[name](*fresh(args)), expected, atol=case.atol, rtol=case.rtol,
                             name=f"{name} {case.label}")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    # the decode step's use: capture once on static buffers, copy new inputs in, replay
    N, C, dtype = 8, 768, torch.bfloat16
    _, y, yb, w, b = add_ln_inputs(N, C, dtype, "cuda", seed=20)
    tokens, positions, wte, wpe, w1, b1 = embed_inputs(N, C, 50257, 1024, dtype, "cuda", seed=21)
    _, fc_w, fc_b = linear_inputs(N, C, 4 * C, dtype, "cuda", seed=22)

    def step():
        s0, h0 = layernorm.embed_layernorm(tokens, positions, wte, wpe, w1, b1, 1e-5)
        s1, h1 = layernorm.add_layernorm(s0, y, yb, w, b, 1e-5)
        return s0, h0, s1, h1, gelu.linear_gelu(h1, fc_w, fc_b)

    side = torch.cuda.Stream()  # warm up (compile, cuBLAS workspaces) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (23, 24):
        gen = torch.Generator().manual_seed(seed)
        tokens.copy_(torch.randint(0, 50257, (N,), generator=gen))
        positions.copy_(torch.randint(0, 1024, (N,), generator=gen))
        y.copy_(torch.randn(N, C, generator=gen).to(dtype))
        graph.replay()
        s0, h0 = layernorm.embed_layernorm_ref(*upcast((tokens, positions, wte, wpe, w1, b1)), 1e-5)
        # the rest from the graph's own (rounded) residual, as the runtime chains them
        s1, h1 = layernorm.add_layernorm_ref(*upcast((outs[0], y, yb, w, b)), 1e-5)
        fc = gelu.linear_gelu_ref(*upcast((outs[3], fc_w, fc_b)))
        for name, got, want in zip(("s0", "h0", "s1", "h1", "fc"), outs, (s0, h0, s1, h1, fc)):
            assert_close(got, want, **TOLERANCES[dtype], name=f"replay {seed} {name}")

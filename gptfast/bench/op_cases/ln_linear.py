"""Cases of `layernorm_linear` (ops/ln_linear.py), at GPT-2's three uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast.ops.common import TOLERANCES
from gptfast.ops.ln_linear import layernorm_linear, layernorm_linear_ref  # noqa: F401 (timed by name)

from . import BenchCase, dtype_name, lazy_generator


def _case(device, R, K, N, dtype, gelu, bias=True, out_dtype=None, label="") -> BenchCase:
    """ln -> linear (+ bias, + GELU) against the unfused sequence: baseline "unfused" =
    F.layer_norm, then F.linear (+ the GELU), as the model ran before."""
    gen = lazy_generator(device, 7000 + R + K + N + int(gelu))

    def make_args():
        g = gen()
        x = (1 + torch.randn(R, K, generator=g, device=device)).to(dtype)
        lnw = (1 + 0.1 * torch.randn(K, generator=g, device=device)).to(dtype)
        lnb = (0.1 * torch.randn(K, generator=g, device=device)).to(dtype)
        w = (0.02 * torch.randn(N, K, generator=g, device=device)).to(dtype)  # GPT-2's init scale
        b = (0.1 * torch.randn(N, generator=g, device=device)).to(dtype) if bias else None
        return (x, lnw, lnb, 1e-5, w, b, gelu, out_dtype)

    def unfused(x, lnw, lnb, eps, w, b, gelu, out_dtype):
        h = F.layer_norm(x, (K,), lnw, lnb, eps)
        y = F.linear(h, w, b)
        y = F.gelu(y, approximate="tanh") if gelu else y
        return y if out_dtype is None else y.to(out_dtype)

    e = torch.tensor([], dtype=dtype).element_size()
    e_out = e if out_dtype is None else torch.tensor([], dtype=out_dtype).element_size()
    tol = TOLERANCES[dtype]
    return BenchCase(
        op="layernorm_linear",
        label=f"{label}R={R} K={K} N={N} {dtype_name(dtype)}" + (" +gelu" if gelu else ""),
        make_args=make_args,
        bytes_moved=(N * K + N * bias + R * K + 2 * K) * e + R * N * e_out,
        flops=2 * R * N * K,
        params=dict(R=R, K=K, N=N, dtype=str(dtype), gelu=gelu),
        baselines={"unfused": unfused},
        atol=tol["atol"] * 4, rtol=tol["rtol"],
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """GPT-2's three uses at R in {1, 8} (quick: 1), bf16: ln_1 -> c_attn (K=768, N=2304),
    ln_2 -> c_fc + GELU (N=3072), ln_f -> head (N=50257, no bias, fp32 out). Bytes: the weight
    once + bias + x + LN affine + the output; FLOPs 2 R N K. Baseline "unfused": layer_norm,
    linear (cuBLAS), GELU. cpu: tiny fp32 cases."""
    if device == "cpu":
        return [_case("cpu", 2, 48, 40, torch.float32, gelu=True), _case("cpu", 1, 48, 97, torch.float32, gelu=False)]
    bf16 = torch.bfloat16
    rows = (1,) if quick else (1, 8)
    cases = []
    for R in rows:
        cases.append(_case(device, R, 768, 2304, bf16, gelu=False, label="c_attn "))
        cases.append(_case(device, R, 768, 3072, bf16, gelu=True, label="c_fc "))
        cases.append(_case(device, R, 768, 50257, bf16, gelu=False, bias=False, out_dtype=torch.float32,
                           label="head "))
    return cases

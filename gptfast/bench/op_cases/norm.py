"""Cases of the decode step's fused small ops: `add_layernorm`, `embed_layernorm` (ops/layernorm.py),
`linear_gelu`, `bias_gelu_` (ops/gelu.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast.ops.common import TOLERANCES
from gptfast.ops.gelu import bias_gelu_, bias_gelu_ref_, linear_gelu, linear_gelu_ref  # noqa: F401 (timed by name)
from gptfast.ops.layernorm import (  # noqa: F401 (the runner times them, found by name)
    add_layernorm,
    add_layernorm_ref,
    embed_layernorm,
    embed_layernorm_ref,
)

from . import BenchCase, dtype_name, lazy_generator


def _ln_params(C: int, dtype, device, g) -> tuple[torch.Tensor, torch.Tensor]:
    weight = (1 + 0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
    bias = (0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
    return weight, bias


def _add_layernorm_case(device, N, C, dtype) -> BenchCase:
    """The decode step's residual add: x the residual, y a projection's output, y_bias its bias."""
    gen = lazy_generator(device, 1000 + N + C)

    def make_args():
        g = gen()
        x = torch.randn(N, C, generator=g, device=device).to(dtype)
        y = torch.randn(N, C, generator=g, device=device).to(dtype)
        y_bias = (0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
        return (x, y, y_bias, *_ln_params(C, dtype, device, g), 1e-5)

    def layer_norm_alone(x, y, y_bias, weight, bias, eps):
        return F.layer_norm(x, (C,), weight, bias, eps)

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="add_layernorm",
        label=f"N={N} C={C} {dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(4 * N * C + 3 * C) * e,
        params=dict(N=N, C=C, dtype=str(dtype)),
        baselines={"layer_norm alone": layer_norm_alone},
        **TOLERANCES[dtype],
    )


def _embed_layernorm_case(device, N, C, V, P, dtype) -> BenchCase:
    gen = lazy_generator(device, 2000 + N + C)

    def make_args():
        g = gen()
        tokens = torch.randint(0, V, (N,), generator=g, device=device)
        positions = torch.randint(0, P, (N,), generator=g, device=device)
        wte = (0.1 * torch.randn(V, C, generator=g, device=device)).to(dtype)
        wpe = (0.1 * torch.randn(P, C, generator=g, device=device)).to(dtype)
        return (tokens, positions, wte, wpe, *_ln_params(C, dtype, device, g), 1e-5)

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="embed_layernorm",
        label=f"N={N} C={C} V={V} P={P} {dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(4 * N * C + 2 * C) * e + 16 * N,
        params=dict(N=N, C=C, V=V, P=P, dtype=str(dtype)),
        **TOLERANCES[dtype],
    )


def _linear_gelu_case(device, N, K, M, dtype) -> BenchCase:
    """GPT-2's c_fc. Baselines: the GEMM alone (what the fused GELU costs), and at N=1 the GEMM
    on x padded to 2 rows (cuBLASLt rejects one row; this measures whether padding would pay)
    and `_addmm_activation` itself (PyTorch's 3-kernel fallback, which mm + bias_gelu_ replaces)."""
    gen = lazy_generator(device, 3000 + N + K + M)

    def make_args():
        g = gen()
        x = torch.randn(N, K, generator=g, device=device).to(dtype)
        weight = (0.02 * torch.randn(M, K, generator=g, device=device)).to(dtype)  # GPT-2's init scale
        bias = (0.1 * torch.randn(M, generator=g, device=device)).to(dtype)
        return (x, weight, bias)

    def linear_alone(x, weight, bias):
        return F.linear(x, weight, bias)

    baselines = {"linear alone": linear_alone}
    if N == 1:

        def padded_to_2_rows(x, weight, bias):
            x2 = x.expand(2, K)  # addmm copies it to a dense [2, K]: one tiny copy kernel
            return torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)[:1]

        def addmm_activation(x, weight, bias):  # the 1-row path before bias_gelu_: 3 kernels
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)

        if device.startswith("cuda"):  # on the CPU _addmm_activation is another function (erf GELU)
            baselines["2-row pad"] = padded_to_2_rows
            baselines["_addmm_activation"] = addmm_activation

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="linear_gelu",
        label=f"N={N} K={K} M={M} {dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(N * K + M * K + M + N * M) * e,
        flops=2 * N * K * M,
        params=dict(N=N, K=K, M=M, dtype=str(dtype)),
        baselines=baselines,
        **TOLERANCES[dtype],
    )


def _bias_gelu_case(device, N, M, dtype) -> BenchCase:
    """c_fc's bias + GELU after a bias-less GEMM. Baseline: eager `F.gelu(y + bias)` in the dtype
    (2 kernels, out of place; PyTorch's fallback does the add inside the GEMM instead)."""
    gen = lazy_generator(device, 4000 + N + M)

    def make_args():
        g = gen()
        y = torch.randn(N, M, generator=g, device=device).to(dtype)
        bias = (0.1 * torch.randn(M, generator=g, device=device)).to(dtype)
        return (y, bias)

    def add_then_gelu(y, bias):
        return F.gelu(y + bias, approximate="tanh")

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="bias_gelu_",
        label=f"N={N} M={M} {dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(2 * N * M + M) * e,
        params=dict(N=N, M=M, dtype=str(dtype)),
        baselines={"add + gelu": add_then_gelu},
        **TOLERANCES[dtype],
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """The decode step's fused ops at GPT-2 sizes (C=768; 1600 is gpt2-xl).

    add_layernorm: N in {1, 64, 256} (quick {1, 256}), C in {768, 1600}, bf16 and fp16 (quick:
    fp16 at one point); bytes = x, y read + s, h written + three [C] vectors; baseline "layer_norm
    alone" = F.layer_norm on x (one eager kernel of the same size: the fused op's target).
    embed_layernorm: N in {1, 256}, C=768, V=50257, P=1024; bytes = the gathered rows + outputs +
    ids. linear_gelu: c_fc, N in {1, 64, 256}, K=768, M=3072; bytes dominated by the weight,
    FLOPs 2 N K M; baselines "linear alone" and, at N=1, "2-row pad" and "_addmm_activation"
    (the old 1-row path). bias_gelu_: N in {1, 256}, M=3072 (full: fp16 too); bytes = y read and
    written + bias; baseline "add + gelu". The eager reference is the unfused eager sequence each
    op replaces. cpu: one tiny fp32 case of each.
    """
    if device == "cpu":
        return [
            _add_layernorm_case("cpu", 5, 96, torch.float32),
            _embed_layernorm_case("cpu", 5, 96, 50, 20, torch.float32),
            _linear_gelu_case("cpu", 3, 32, 96, torch.float32),
            _bias_gelu_case("cpu", 3, 100, torch.float32),
        ]
    fp16, bf16 = torch.float16, torch.bfloat16
    if quick:
        add = [(n, c, bf16) for c in (768, 1600) for n in (1, 256)] + [(256, 768, fp16)]
        embed = [(1, bf16), (256, bf16)]
        gelu = [(1, bf16), (64, bf16), (256, bf16)]
        bias_gelu = [(1, bf16), (256, bf16)]
    else:
        add = [(n, c, dt) for dt in (bf16, fp16) for c in (768, 1600) for n in (1, 64, 256)]
        embed = [(n, dt) for dt in (bf16, fp16) for n in (1, 256)]
        gelu = [(n, bf16) for n in (1, 64, 256)] + [(256, fp16)]
        bias_gelu = [(n, dt) for dt in (bf16, fp16) for n in (1, 256)]
    cases = [_add_layernorm_case(device, n, c, dt) for n, c, dt in add]
    cases += [_embed_layernorm_case(device, n, 768, 50257, 1024, dt) for n, dt in embed]
    cases += [_linear_gelu_case(device, n, 768, 3072, dt) for n, dt in gelu]
    cases += [_bias_gelu_case(device, n, 3072, dt) for n, dt in bias_gelu]
    return cases

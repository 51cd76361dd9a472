"""Cases of `int8_linear` (ops/quant_linear.py)."""

from __future__ import annotations

import torch

from gptfast.ops.common import TOLERANCES
from gptfast.ops.quant_linear import int8_linear, int8_linear_ref  # noqa: F401 (timed by name)

from . import BenchCase, lazy_generator


def _int8_linear_case(device, M, N, K, dtype) -> BenchCase:
    gen = lazy_generator(device, 0)

    def make_args():
        g = gen()
        w = torch.randn(N, K, generator=g, device=device) * 0.02
        s = w.abs().amax(1) / 127
        q = torch.round(w / s[:, None]).to(torch.int8)
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        b = torch.randn(N, generator=g, device=device).to(dtype)
        return x, q, s.float(), b

    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    e = torch.empty((), dtype=dtype).element_size()
    return BenchCase(
        op="int8_linear", label=f"M={M} N={N} K={K} {name}", make_args=make_args,
        bytes_moved=N * K + 4 * N + (M * K + M * N + N) * e, flops=2 * M * N * K,
        params=dict(M=M, N=N, K=K, dtype=name), **TOLERANCES[dtype],
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """GPT-2 124M's decode matmuls at batch 1 and 8 in bf16 (c_fc and the tied head)."""
    shapes = [(1, 3072, 768), (8, 3072, 768)] if quick else [
        (1, 2304, 768), (1, 3072, 768), (1, 768, 3072), (1, 50257, 768), (8, 3072, 768), (8, 50257, 768)]
    return [_int8_linear_case(device, M, N, K, torch.bfloat16) for M, N, K in shapes]

"""Cases of `linear_residual` and `attn_merge_linear_residual` (ops/proj_residual.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast.ops.common import TOLERANCES
from gptfast.ops.proj_residual import (  # noqa: F401 (the runner times them, found by name)
    attn_merge_linear_residual,
    attn_merge_linear_residual_ref,
    linear_residual,
    linear_residual_ref,
    merge_partials_ref,
)

from . import BenchCase, dtype_name, lazy_generator


def _case(device, R, K, N, dtype) -> BenchCase:
    """Baseline "unfused": F.linear without bias, then `residual + y + bias` as the model's
    `add_layernorm` did it (here without the LayerNorm, which moved into the next GEMV)."""
    gen = lazy_generator(device, 8000 + R + K + N)

    def make_args():
        g = gen()
        x = torch.randn(R, K, generator=g, device=device).to(dtype)
        w = (0.02 * torch.randn(N, K, generator=g, device=device)).to(dtype)
        b = (0.1 * torch.randn(N, generator=g, device=device)).to(dtype)
        res = torch.randn(R, N, generator=g, device=device).to(dtype)
        return (x, w, b, res)

    def unfused(x, w, b, res):
        return res + F.linear(x, w) + b

    e = torch.tensor([], dtype=dtype).element_size()
    tol = TOLERANCES[dtype]
    return BenchCase(
        op="linear_residual",
        label=f"R={R} K={K} N={N} {dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(N * K + N + 2 * R * N + R * K) * e,
        flops=2 * R * N * K,
        params=dict(R=R, K=K, N=N, dtype=str(dtype)),
        baselines={"unfused": unfused},
        atol=tol["atol"] * 4, rtol=tol["rtol"],
    )


def _merge_case(device, R, H, S, D, dtype) -> BenchCase:
    """Baseline "merge_then_linear": the merge (eager, as `merge_partials_ref`), F.linear, the
    residual add: the decode step's merge kernel + c_proj + add that this replaces."""
    gen = lazy_generator(device, 9000 + R + S)
    N = H * D

    def make_args():
        g = gen()
        part_acc = torch.randn(R, H, S, D, generator=g, device=device)
        m = torch.randn(R, H, S, generator=g, device=device) * 4
        l_sum = torch.rand(R, H, S, generator=g, device=device) * 10 + 1
        part_ml = torch.stack((m, l_sum), dim=-1).contiguous()
        w = (0.02 * torch.randn(N, N, generator=g, device=device)).to(dtype)
        b = (0.1 * torch.randn(N, generator=g, device=device)).to(dtype)
        res = torch.randn(R, N, generator=g, device=device).to(dtype)
        return (part_acc, part_ml, w, b, res)

    def merge_then_linear(part_acc, part_ml, w, b, res):
        y = merge_partials_ref(part_acc, part_ml).to(res.dtype).reshape(R, N)
        return res + F.linear(y, w, b)

    e = torch.tensor([], dtype=dtype).element_size()
    tol = TOLERANCES[dtype]
    return BenchCase(
        op="attn_merge_linear_residual",
        label=f"R={R} H={H} S={S} D={D} {dtype_name(dtype)}",
        make_args=make_args,
        bytes_moved=(N * N + N + 2 * R * N) * e + R * H * S * (D + 2) * 4,
        flops=2 * R * N * N,
        params=dict(R=R, H=H, S=S, D=D, dtype=str(dtype)),
        baselines={"merge_then_linear": merge_then_linear},
        atol=tol["atol"] * 4, rtol=tol["rtol"],
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """GPT-2's projections into the residual stream, bf16, R in {1, 8} (quick: 1): the MLP's
    c_proj (K=3072, N=768) as `linear_residual`, and the attention c_proj (K=N=768) with the merge
    of S=8 split-KV partials of 12 heads as `attn_merge_linear_residual`. Bytes: the weight once
    + bias + residual read + output written + x (or the fp32 partials). cpu: tiny fp32 cases."""
    if device == "cpu":
        return [_case("cpu", 3, 40, 24, torch.float32), _merge_case("cpu", 2, 2, 3, 8, torch.float32)]
    bf16 = torch.bfloat16
    rows = (1,) if quick else (1, 8)
    cases = [_case(device, R, 3072, 768, bf16) for R in rows]
    cases += [_merge_case(device, R, 12, 8, 64, bf16) for R in rows]
    return cases

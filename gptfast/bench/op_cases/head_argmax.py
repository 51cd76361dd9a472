"""Cases of `layernorm_head_argmax` (ops/head_argmax.py), GPT-2's greedy head."""

from __future__ import annotations

import torch

from gptfast.ops import ln_linear
from gptfast.ops._triton import triton
from gptfast.ops.head_argmax import layernorm_head_argmax, layernorm_head_argmax_ref  # noqa: F401 (timed by name)
from gptfast.ops.sampling import sample, sample_ref

from . import BenchCase, lazy_generator


def _case(device, R, C, V, dtype) -> BenchCase:
    """Baseline "head_then_sample": `layernorm_linear` to the logits (the model's head, in the
    dtype), then the greedy sampler (`ops.sample` with temperature 0), the two launches it
    replaces (three with the final LayerNorm of the older path)."""
    gen = lazy_generator(device, 9500 + R + V)
    on_cuda = device.startswith("cuda")

    def make_args():
        g = gen()
        x = torch.randn(R, C, generator=g, device=device).to(dtype)
        lnw = (1 + 0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
        lnb = (0.1 * torch.randn(C, generator=g, device=device)).to(dtype)
        w = (0.1 * torch.randn(V, C, generator=g, device=device)).to(dtype)
        return (x, lnw, lnb, 1e-5, w)

    def head_then_sample(x, lnw, lnb, eps, w):
        head = ln_linear.layernorm_linear if on_cuda else ln_linear.layernorm_linear_ref
        logits = head(x, lnw, lnb, eps, w, None)
        zf = torch.zeros(R, dtype=torch.float32, device=x.device)
        zl = torch.zeros(R, dtype=torch.int64, device=x.device)
        return (sample if on_cuda else sample_ref)(logits, zf, zl.int(), zf + 1, zl, zl)

    def check(out_fast, out_ref, args) -> str | None:
        """Tokens must agree exactly, except where the reference's top two logits are within
        rounding of each other (a different accumulation order may swap them)."""
        (tok_f, st_f), (tok_r, st_r) = out_fast, out_ref
        if not torch.equal(st_f.cpu(), st_r.cpu()):
            return f"status differs: fast {st_f.tolist()}, ref {st_r.tolist()}"
        differ = (tok_f != tok_r).nonzero().flatten().tolist()
        if not differ:
            return None
        x, lnw, lnb, eps, w = args
        logits = ln_linear.layernorm_linear_ref(x.float(), lnw.float(), lnb.float(), eps, w.float(), None)
        for r in differ:
            gap = (logits[r, tok_r[r]] - logits[r, tok_f[r]]).abs().item()
            if gap > 2e-2 * logits[r].abs().max().item():
                return f"row {r}: fast token {tok_f[r].item()}, ref {tok_r[r].item()}, logit gap {gap:.3g}"
        return None

    e = torch.tensor([], dtype=dtype).element_size()
    G = triton.cdiv(V, 8)  # column blocks, at most (8-column tiles); the count needs the SM count
    return BenchCase(
        op="layernorm_head_argmax",
        label=f"R={R} C={C} V={V} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=(V * C + R * C + 2 * C) * e + 12 * R * G + 12 * R,
        flops=2 * R * V * C,
        params=dict(R=R, C=C, V=V, dtype=str(dtype)),
        baselines={"head_then_sample": head_then_sample},
        check=check,
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """GPT-2's greedy head: C=768, V=50257, bf16, R in {1, 8} (quick: 1). Bytes: the head weight
    once + x + LN affine + the partials; FLOPs 2 R V C. Baseline "head_then_sample": the logits
    head, then the greedy sampler. cpu: one tiny fp32 case."""
    if device == "cpu":
        return [_case("cpu", 2, 32, 97, torch.float32)]
    return [_case(device, R, 768, 50257, torch.bfloat16) for R in ((1,) if quick else (1, 8))]

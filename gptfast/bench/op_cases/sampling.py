"""Cases of `sample` (ops/sampling.py), against HF's and gpt-fast's samplers."""

from __future__ import annotations

import torch

from gptfast.ops.sampling import filter_logits_ref, row_seeds, sample, sample_ref  # noqa: F401 (timed by name)

from . import BenchCase


def _hf_style(logits, temperature, top_k, top_p, seeds, offsets, *, t: float, k: int, p: float):
    """Baseline: transformers' warpers as HF runs them (scalar settings), then torch.multinomial."""
    x = logits.float() / t
    if k:
        x = x.masked_fill(x < torch.topk(x, k)[0][..., -1, None], float("-inf"))
    if p < 1.0:
        sorted_x, sorted_idx = torch.sort(x, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - p
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return torch.multinomial(torch.softmax(x, dim=-1), num_samples=1).squeeze(1)


def _gptfast_style(logits, temperature, top_k, top_p, seeds, offsets, *, t: float, k: int):
    """Baseline: gpt-fast's logits_to_probs (topk pivot, softmax) + exponential race, no host sync."""
    x = logits.float() / t
    v, _ = torch.topk(x, k)
    x = torch.where(x < v[:, -1:], float("-inf"), x)
    probs = torch.softmax(x, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1)


def _kept_ref(logits, temperature, top_k, top_p) -> torch.Tensor:
    """[B, V] bool: the tokens a row may draw (greedy rows: its argmax only)."""
    greedy = temperature <= 0
    kept = torch.isfinite(filter_logits_ref(logits, temperature, top_k, top_p))  # sampled rows
    arg = torch.zeros_like(kept).scatter_(1, torch.argmax(logits.float(), -1, keepdim=True), True)
    return torch.where(greedy[:, None], arg, kept)


def check_draws(out_fast, out_ref, args) -> str | None:
    """Draws differ from the reference's by design: statuses must agree and every token of a
    status-0 row must lie in the row's kept set (greedy rows: equal to the argmax)."""
    (tok_f, st_f), (tok_r, st_r) = out_fast, out_ref
    if not torch.equal(st_f, st_r):
        bad = (st_f != st_r).nonzero().flatten()[:8].tolist()
        return f"status differs at rows {bad}: fast {st_f[bad].tolist()}, ref {st_r[bad].tolist()}"
    kept = _kept_ref(*args[:4])
    ok = st_f == 0
    for name, tok in (("fast", tok_f), ("ref", tok_r)):
        if bool((tok[~ok] != -1).any()):
            return f"{name}: a flagged row got a token instead of -1"
        inside = kept[ok].gather(1, tok[ok].clamp(0, kept.shape[1] - 1)[:, None]).squeeze(1) & (tok[ok] >= 0)
        if not bool(inside.all()):
            rows = ok.nonzero().flatten()[~inside][:8].tolist()
            return f"{name}: rows {rows} drew tokens outside the kept set: {tok[rows].tolist()}"
    return None


def _case(device: str, B: int, V: int, t: float, k: int, p: float, dtype=torch.float32) -> BenchCase:
    def make_args():
        logits = torch.randn(B, V, device=device, dtype=torch.float32).mul_(3.0).to(dtype)
        temperature = torch.full((B,), t, device=device)
        top_k = torch.full((B,), k, device=device, dtype=torch.int32)
        top_p = torch.full((B,), p, device=device)
        offsets = torch.randint(0, 2**20, (B,), device=device, dtype=torch.int64)
        return logits, temperature, top_k, top_p, row_seeds(B * V + k, B, device), offsets

    if p < 1.0:
        baselines = {"hf": lambda *a: _hf_style(*a, t=t, k=k, p=p)}
    else:
        baselines = {"gptfast_style": lambda *a: _gptfast_style(*a, t=t, k=k)}
    dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return BenchCase(op="sample", label=f"B={B} V={V} T={t} top_k={k} top_p={p} {dt}", make_args=make_args,
                     bytes_moved=B * V * dtype.itemsize + 12 * B, flops=8 * B * V,
                     params=dict(B=B, V=V, temperature=t, top_k=k, top_p=p, dtype=dt),
                     check=check_draws, baselines=baselines)


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """Sampling at GPT-2's vocabulary (V=50257), fp32 logits, B = 1, 8, 64, 256.

    (a) T=0.8, top_k=50, top_p=0.9 against the HF-style sort-based path + multinomial;
    (b) top_k=200 only against the gpt-fast style (topk pivot, softmax, exponential race).
    bytes_moved = the logits read once. The check compares supports, not draws (`check_draws`).
    cpu: two tiny cases (the interpreter, or the reference against itself).
    """
    if device == "cpu":
        return [_case("cpu", 2, 997, 0.8, 50, 0.9), _case("cpu", 2, 1000, 1.0, 200, 1.0)]
    batches = (1, 64, 256) if quick else (1, 8, 64, 256)
    cases = [_case(device, b, 50257, 0.8, 50, 0.9) for b in batches]
    cases += [_case(device, b, 50257, 1.0, 200, 1.0) for b in batches]
    return cases

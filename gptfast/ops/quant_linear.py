"""int8 weight-only linear: `out = x @ (q * scale[:, None]).T + bias`, dequantised in registers.

Math (weights quantised per output channel, symmetric, see `gptfast.quant`)::

    W[n, k] ~= q[n, k] * scale[n]              q int8 in [-127, 127], scale fp32 > 0
    out[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]

The scale is applied once per output after the k-sum (it does not depend on k), so the inner
loop is one int8 -> fp32 conversion and one FMA per weight; accumulation in fp32.

Kernel and its floor (decode-sized M: the weight read dominates):

- `int8_linear`: grid `(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))` (tile sizes: `_config`). Each
  program owns BLOCK_N output channels of BLOCK_M rows and walks K in BLOCK_K tiles: one
  `[BLOCK_N, BLOCK_K]` int8 weight tile (read once for all BLOCK_M rows) and a
  `[BLOCK_M, BLOCK_K]` tile of x per step, the
  product summed over k in registers (`[BLOCK_M, BLOCK_N, BLOCK_K]` broadcast, no tensor cores:
  at M <= 8 a GEMV is bandwidth-bound and an MMA would waste 15/16 of its rows). Bytes: N K
  (int8 weights) + 4 N (scales) + M K e (x) + M N e (out) + N e (bias). GPT-2 124M's matmuls
  at batch 1: 124 MB of int8 weights per decode step (the tied head included) against 247 MB in
  bf16, so the floor halves: ~26 us per step on an H200 (~4.8 TB/s) instead of ~52.
  Larger M runs in row blocks of BLOCK_M (the weight is then re-read cdiv(M, BLOCK_M) times,
  from L2 for GPT-2's matrices); prefill-sized M belongs to a tensor-core GEMM and is not what
  this op is for.

References: Dettmers et al., "LLM.int8()" (2022) and Frantar et al., "GPTQ" (2022) for
per-channel weight-only int8; gpt-fast's `WeightOnlyInt8Linear` (the same scheme, dequantised
by PyTorch); Triton tutorial 03 (matrix multiplication) for the tiling.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins where Triton is not installed

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _int8_linear_kernel(
    out_ptr,  # [M, N] x's dtype, row stride stride_om; written
    stride_om,
    x_ptr,  # [M, K] fp16/bf16/fp32, row stride stride_xm, unit column stride
    stride_xm,
    q_ptr,  # [N, K] int8, row stride stride_qn, unit column stride
    stride_qn,
    scale_ptr,  # [N] fp32 contiguous, each output channel's scale
    bias_ptr,  # [N] x's dtype; read when HAS_BIAS
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels
    ks = tl.arange(0, BLOCK_K)
    mask_m = rows < M
    mask_n = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        mask_k = k < K
        w = tl.load(q_ptr + cols[:, None] * stride_qn + k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BLOCK_M, BLOCK_N, BLOCK_K]
        acc += tl.sum(prod, axis=2)
    scale = tl.load(scale_ptr + cols, mask=mask_n, other=0.0)  # [BLOCK_N] fp32
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check(name: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: x must be fp32, fp16 or bf16, got {x.dtype}")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"{name}: q must be a 2-D int8 tensor [N, K], got {q.dtype} of shape {tuple(q.shape)}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[-1]} features but q has K = {q.shape[1]} (q is [N, K])")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0],):
        raise ValueError(f"{name}: scale must be fp32 of shape ({q.shape[0]},), got {scale.dtype} "
                         f"of shape {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (q.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({q.shape[0]},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, q, scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{name}: every tensor must be on one device, got {sorted(map(str, devices))}")


def _config(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): the rows of a decode batch (up to 8) in one program, so each
    weight tile is read once; BLOCK_M * BLOCK_N = 16 and BLOCK_K = 128, i.e. 2048 products a step,
    16 a thread at 4 warps, each thread loading 16 contiguous int8 weights (one 16-byte load).
    Compiled for sm_90 by `gptfast kernels --quantize int8` (ptxas): 47 registers at BLOCK_M = 1,
    40 at 2-8, no spills (kernels-sm_90-gpt2-int8-20261203-200814); a [1, 64, 64]
    tile needed 235 registers. Small tiles also give GPT-2's narrow matrices enough programs
    (N = 768 at batch 1: 48)."""
    block_m = min(triton.next_power_of_2(max(M, 1)), 8)
    return block_m, 16 // block_m, 128


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T + bias` with int8 weights dequantised in registers (Triton).

    Parameters
    ----------
    x : (..., K) fp32, fp16 or bf16
    q : (N, K) int8, contiguous rows
    scale : (N,) fp32, each output channel's scale
    bias : (N,) or None

    Returns
    -------
    (..., N) tensor in x's dtype.

    Examples
    --------
    >>> q, s = gptfast.quant.quantize_int8(w)  # w: (N, K)
    >>> y = int8_linear(x, q, s, b)            # ~ F.linear(x, w, b)
    """
    _check("int8_linear", x, q, scale, bias)
    N, K = q.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if q.stride(1) != 1:
        q = q.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        block_m, block_n, block_k = _config(M)
        grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
        _int8_linear_kernel[grid](
            out, out.stride(0), x2, x2.stride(0), q, q.stride(0), scale.contiguous(),
            bias if bias is not None else scale, M, N, K,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return out.view(*x.shape[:-1], N)


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager reference of `int8_linear` (same signature): the k-sum in fp32, then the scale and
    the bias, cast to x's dtype."""
    _check("int8_linear_ref", x, q, scale, bias)
    out = (x.float() @ q.float().T) * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)

"""Shared pieces of the small-batch (GEMV) decode ops: `ln_linear`, `proj_residual`, `head_argmax`.

Not an op of its own: the Triton helpers the fused GEMV kernels inline and the launch
configuration they share (their argument checks are in `checks`).

A decode step with 1-8 rows multiplies a few activation rows by each weight matrix: every weight
is read once per step and used for 1-8 rows, so the step is bound by the weight bytes (GPT-2 124M
in bf16: ~247 MB per step), not by FLOPs. The kernels are GEMVs ("rows x weight^T") shaped for
that:

- the weight is nn.Linear's `[N_out, K]`, rows contiguous along K: a program loads a
  `[BLOCK_N, BLOCK_K]` tile whose rows are contiguous runs of K (16-byte vector loads);
- the output columns are split over programs (`BLOCK_N` columns each, 8 or 16, chosen so there
  are about two programs per SM), each program walks the whole K dimension, so every weight element
  is read by exactly one program, once, for all the rows of the batch (a `BLOCK_R`-row tile,
  `BLOCK_R` in {1, 2, 4, 8}); no split-K, so no cross-program reduction and no atomics: results
  are deterministic;
- products are accumulated in fp32 elementwise in a `[BLOCK_R, BLOCK_N, BLOCK_K]` tile and
  summed over K once after the loop (CUDA-core FMAs, no tensor cores: at <= 8 rows they would
  sit idle, and exact fp32 products keep fp32 runs within the parity policy); the loop body is
  loads and FMAs only, unrolled by 2 so that two tiles' weight loads are in flight together
  (16-byte loads: the launch specialises on 16-byte-aligned pointers and strides);
- the cheap work rides along: a LayerNorm of the input rows in the prologue (each program
  recomputes the rows' mean and variance, two passes over K elements per row from L1/L2, then
  normalises each K tile as it goes), bias, GELU or a residual add in the epilogue.

Registers and spills are checked by compiling every variant the model launches for sm_90
without a GPU (tests/sm90_compile.py; tests/test_gemv_decode.py asserts no spills).

Trade-off (out = 768 columns, e.g. the projections into the residual stream): 8-column tiles give
96 programs, under one per SM on a 132-SM H100/H200; split-K would give more, but needs either
atomics (non-deterministic sums) or a second pass (a launch, which is what these kernels remove).
Each program then streams 8 rows x K contiguous weights with several 16-byte loads in flight per
thread. Whether that reaches full bandwidth is what the ops' benchmark cases report: each op
against the unfused sequence it replaces, in % of the byte floor.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .common import on_cuda
from .common import sm_count as _device_sm_count

MAX_ROWS = 8  # rows per program; more rows run in more row blocks (the model uses this path for <= 8)
_MIN_BLOCK_N = 8
_MAX_BLOCK_N = 16
_MAX_BLOCK_K = 512
# fp32 elements of the [BLOCK_R, BLOCK_N, BLOCK_K] product per program: 32 per thread at 4 warps
_PRODUCT_ELEMENTS = 4096
_PROGRAMS_PER_SM = 2
# Off the GPU (the interpreter): an SM count and a column-block cap that give few, wide programs
# (the interpreter's time grows with the programs it runs; registers do not matter there), still
# several column blocks for the tests' awkward sizes (N=97: 2 blocks of 64).
_INTERPRETER_SM_COUNT = 1
_INTERPRETER_MAX_BLOCK_N = 64
_INTERPRETER_PRODUCT_ELEMENTS = 65536


# --------------------------------------------------------------------------------------------
# Triton helpers (inlined into the kernels of ln_linear, linear_residual, head_argmax)
# --------------------------------------------------------------------------------------------


@triton.jit
def gelu_tanh(u):
    """gelu_tanh(u) = 0.5 u (1 + tanh(z)) = u * sigmoid(2 z), z = sqrt(2/pi) (u + 0.044715 u^3);
    the sigmoid form has no cancellation for negative u (as `gelu.bias_gelu_`)."""
    z2 = 1.5957691216057308 * (u + 0.044715 * u * u * u)
    return u / (1.0 + tl.exp(-z2))


@triton.jit
def row_stats(
    x_rows,  # [BLOCK_R, 1] pointers to the starts of the rows, each K contiguous elements
    mask_r,
    K,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Mean and 1/sqrt(var + eps) of the rows `x_rows[r] + k`, k < K (fp32, biased variance, the
    centred second pass of `layernorm.add_layernorm`), reading K in BLOCK_K tiles."""
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        m = mask_r[:, None] & (k < K)[None, :]
        total += tl.sum(tl.load(x_rows + k[None, :], mask=m, other=0.0).to(tl.float32), 1)
    mean = total / K
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        m = mask_r[:, None] & (k < K)[None, :]
        d = tl.load(x_rows + k[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]
        sq += tl.sum(tl.where(m, d * d, 0.0), 1)
    return mean, tl.rsqrt(sq / K + eps)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


def sm_count(device: torch.device) -> int:
    return _device_sm_count(device, _INTERPRETER_SM_COUNT)


def blocks(R: int, N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_K) for R rows, N output columns, K inputs on `device`.

    BLOCK_N: the largest of 16 and 8 that still gives `_PROGRAMS_PER_SM` programs per SM (8
    when none does) and leaves room for 64-wide K tiles (8 columns at 8 rows). BLOCK_K: the
    product tile holds at most `_PRODUCT_ELEMENTS` fp32 values, at most 512; a power of 2
    dividing K is preferred (no masked tail), down to 64.
    E.g. on a 132-SM GPU, R=1: QKV (N=2304, K=768) -> 8 x 256 (288 programs); c_fc (3072) -> 8 x 256
    (384); out=768 -> 8 x 256 (96); the MLP's c_proj (K=3072) -> 8 x 512 (96); the head
    (N=50257) -> 16 x 256 (3142). R=8: 8 x 64 everywhere (the head: 6283 programs).

    Why so narrow: compiled for sm_90 (bf16), wider tiles cost registers without adding bytes in
    flight per thread (the head at 64 x 128: 255 registers, at 16 x 256: 56); every variant the
    model uses stays at <= 96 registers (158 for the merge prologue at R=8) with no spills.
    """
    sms = sm_count(device)
    on_gpu = on_cuda(device)
    max_n = _MAX_BLOCK_N if on_gpu else _INTERPRETER_MAX_BLOCK_N
    product = _PRODUCT_ELEMENTS if on_gpu else _INTERPRETER_PRODUCT_ELEMENTS
    block_r = min(MAX_ROWS, triton.next_power_of_2(max(R, 1)))
    # at most as many columns as leave K tiles of 64 (128-byte bf16 runs per weight row)
    block_n = max(_MIN_BLOCK_N, min(max_n, product // (block_r * 64)))
    while block_n > _MIN_BLOCK_N and triton.cdiv(N, block_n) < _PROGRAMS_PER_SM * sms:
        block_n //= 2
    cap = min(_MAX_BLOCK_K, max(16, product // (block_r * block_n)), triton.next_power_of_2(K))
    block_k = cap
    while block_k > 64 and K % block_k:
        block_k //= 2
    if K % block_k:
        block_k = cap
    return block_r, block_n, block_k

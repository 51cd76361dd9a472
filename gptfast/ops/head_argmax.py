"""Greedy decoding's head: final LayerNorm -> LM-head GEMV -> argmax, token ids without logits.

Math (x: [R, C] the residual stream, W: [V, C] the head, the tied `wte`)::

    logits = round(LN(x) @ W^T)        (rounded to x's dtype, as the full-logits path stores them)
    token  = min { i : logits[i] = max_j logits[j] }      (ties to the lowest id)
    status = 1 if some logit is NaN or +inf, 2 if none is finite, else 0;  token = -1 if status != 0

exactly what `sampling.sample` gives a greedy row (temperature <= 0) of the full logits: same
tokens, same flags. For greedy rows with no logits processor and no score output; every other row
needs the logits (`ln_linear.layernorm_linear`, then the sampler).

Two kernels:

1. `ln_linear`'s kernel in its ARGMAX mode (grid `(G, cdiv(R, BLOCK_R))`, G = cdiv(V, BLOCK_N)
   column blocks, e.g. 3142 for GPT-2 at batch 1 on 132 SMs): LN prologue, GEMV, and an epilogue that reduces
   its BLOCK_N logits of each row to (max, lowest column of the max, flags) written to
   `[R, G]` partials (fp32, int32, int32). The logits never reach DRAM.
2. `_argmax_reduce_kernel`, grid `(R,)`: one program per row reduces its G partials (in column
   order, so ties keep the lowest id) to the token and status.

Bytes: V C e (the head, 77 MB for GPT-2 124M in bf16, the floor: 16 us at 4.8 TB/s) + R C e (x)
+ 2 C e (LN affine) + 12 R G (partials, written and read once) + 12 R (outputs), against the
unfused head + greedy sampler's extra R V (e + e) (logits written, then read). FLOPs 2 R V C.
Deterministic: no atomics, a fixed reduction order.
"""

from __future__ import annotations

import torch

from . import ln_linear
from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_eps, check_launch_device, check_rows, check_vector
from .sampling import sample_ref

_MAX_BLOCK_G = 1024

# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["G"])
def _argmax_reduce_kernel(
    tok_ptr,  # [R] int64; written: the argmax id, -1 for a flagged row
    status_ptr,  # [R] int32; written: 0 ok, 1 NaN/+inf logit, 2 no finite logit
    pmax_ptr,  # [R, G] fp32 contiguous: each column block's max
    pidx_ptr,  # [R, G] int32 contiguous: the column of each block's max
    pflag_ptr,  # [R, G] int32 contiguous: each block's NaN/finite flags
    G,
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_G)
    best = float("-inf")
    best_col = 2147483647
    flags = 0
    for g0 in range(0, G, BLOCK_G):
        g = g0 + lanes
        mask = g < G
        # partials [R, G] contiguous, in column order
        m = tl.load(pmax_ptr + row * G + g, mask=mask, other=float("-inf"))
        col = tl.load(pidx_ptr + row * G + g, mask=mask, other=2147483647)
        flags |= tl.reduce_or(tl.load(pflag_ptr + row * G + g, mask=mask, other=0), 0)
        chunk_best = tl.max(m, 0)
        chunk_col = tl.min(tl.where(m == chunk_best, col, 2147483647), 0)
        # a later chunk wins only with a strictly larger max, or an equal max at a lower column
        # (it cannot be lower, chunks are in column order, but the rule needs no such assumption)
        take = (chunk_best > best) | ((chunk_best == best) & (chunk_col < best_col))
        best_col = tl.where(take, chunk_col, best_col)
        best = tl.maximum(best, chunk_best)
    status = tl.where((flags & 1) != 0, 1, tl.where((flags & 2) == 0, 2, 0))
    token = tl.where(status == 0, best_col.to(tl.int64), -1)
    tl.store(tok_ptr + row, token)
    tl.store(status_ptr + row, status.to(tl.int32))


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def layernorm_head_argmax(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens straight from the residual stream: `argmax(LayerNorm(x) @ weight.T)` per row,
    ties to the lowest id, with the sampler's flags (Triton, two launches, no logits in DRAM).

    CUDA-graph capturable (grid and partials from shapes only).

    Parameters
    ----------
    x : Tensor [R, C]
        fp32/fp16/bf16, last dimension contiguous, any row stride.
    ln_weight, ln_bias : Tensor [C] or None
        The final LayerNorm's affine terms, x's dtype.
    eps : float
        Added to the variance, >= 0.
    weight : Tensor [V, C]
        The LM head (nn.Linear layout, e.g. the tied `wte.weight`), x's dtype, rows contiguous.
    out : (tokens, status) or None
        Contiguous [R] int64 and [R] int32 tensors on x's device to write into (a CUDA graph's
        static outputs); None allocates them.

    Returns
    -------
    tokens : Tensor [R], int64
        The argmax id, or -1 for a flagged row.
    status : Tensor [R], int32
        0 ok; 1 a logit is NaN or +inf; 2 no logit is finite (as `sampling.sample`).

    Examples
    --------
    >>> tokens, status = layernorm_head_argmax(x, ln_f.weight, ln_f.bias, 1e-5, wte.weight)
    """
    name = "layernorm_head_argmax"
    check_rows(name, "x", x)
    R, C = x.shape
    if C < 1:
        raise ValueError(f"{name}: x needs C >= 1 columns (the LayerNorm is over them), got shape {tuple(x.shape)}")
    for arg, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_vector(name, arg, t, C, x.dtype)
    eps = check_eps(name, eps)
    V = ln_linear._check_linear(name, C, x.dtype, weight, None)
    if V < 1:
        raise ValueError(f"{name}: weight needs at least one row (the vocabulary), got shape {tuple(weight.shape)}")
    device = check_launch_device(name, x, ln_weight, ln_bias, weight)
    tokens, status = _outputs(name, R, device, out)
    if R == 0:
        return tokens, status
    G = ln_linear.column_blocks(R, V, C, device)
    pmax = torch.empty((R, G), dtype=torch.float32, device=device)
    pidx = torch.empty((R, G), dtype=torch.int32, device=device)
    pflag = torch.empty((R, G), dtype=torch.int32, device=device)
    ln_linear.launch(pmax, x, x, x, x, x, ln_weight, ln_bias, weight, None, eps, False, False, R, C,
                     argmax=(pidx, pflag))
    block_g = min(_MAX_BLOCK_G, triton.next_power_of_2(G))
    _argmax_reduce_kernel[(R,)](tokens, status, pmax, pidx, pflag, G, BLOCK_G=block_g,
                                num_warps=max(1, min(4, block_g // 256)))
    return tokens, status


def _outputs(name: str, R: int, device, out) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return (torch.empty(R, dtype=torch.int64, device=device),
                torch.empty(R, dtype=torch.int32, device=device))
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{name}: out must be a (tokens, status) pair of tensors, got {type(out).__name__}")
    for arg, t, dtype in (("out tokens", out[0], torch.int64), ("out status", out[1], torch.int32)):
        if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != (R,)
                or t.stride(0) != 1 or t.device != device):
            got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a contiguous [R] = ({R},) {dtype} tensor on {device}, got {got}")
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# reference (the unfused sequence, eager)
# --------------------------------------------------------------------------------------------


def layernorm_head_argmax_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `layernorm_head_argmax` (same signature): `ln_linear.layernorm_linear_ref`
    (logits in x's dtype), then `sampling.sample_ref` with every row greedy."""
    logits = ln_linear.layernorm_linear_ref(x, ln_weight, ln_bias, eps, weight, None)
    R = x.shape[0]
    zeros_f = torch.zeros(R, dtype=torch.float32, device=x.device)
    zeros_i = torch.zeros(R, dtype=torch.int32, device=x.device)
    zeros_l = torch.zeros(R, dtype=torch.int64, device=x.device)
    return sample_ref(logits, zeros_f, zeros_i, zeros_f + 1.0, zeros_l, zeros_l, out=out)

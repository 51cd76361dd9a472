"""int8 weight quantisation: per-output-channel symmetric int8 copies of the linear weights.

`GPT2.from_pretrained(..., quantize="int8")` (or `from_config`) keeps the model's float
parameters as they are (the state dict, HF conversion and every other reader see no change) and
runs each block's four linears and the output head on int8 copies of their weights:

    scale[n] = max_k |W[n, k]| / 127          (fp32; an all-zero row gets scale 1)
    q[n, k]  = round(W[n, k] / scale[n])      (int8 in [-127, 127])

One scale per output channel keeps a large row from crushing the others; symmetric (no zero
point) keeps the dequantisation one multiply after the k-sum. The embeddings (a decode step
reads one row of each), LayerNorms and biases stay in the model's dtype. The head is quantised
too: it is the largest matrix (38.6M of GPT-2 124M's 124M parameters) and each vocabulary row
gets its own scale.

The int8 copies follow the float weights: each copy is keyed by its weight's address, version
counter, device and dtype (`_key`), so an in-place change, a replacement, a move or a cast
re-quantises it at its next use (inference tensors keep no version counter: a weight created
under `torch.inference_mode()` is re-quantised at every call).

How the matmul runs:

- CUDA: `gptfast.ops.int8_linear`, a Triton GEMV that reads the int8 weight and dequantises it in
  registers (the activations stay in the model's dtype): weight-only int8, half the bytes of bf16.
- CPU: PyTorch's quantized engine (`torch.ops.quantized.linear_dynamic` on weights prepacked
  once by `linear_prepack`), the same scheme as CTranslate2's `int8_float32`: the activations are
  quantised to 8 bits on the fly and multiplied in int8 (VNNI/AMX). To give every row its own
  activation range (a row with small values is not crushed by a large one), each row is divided
  by its max |x| before the call and the output row multiplied back (a linear map commutes with
  the per-row scale), so the per-tensor range the kernel picks spans [-1, 1] at most.
  `reduce_range=True` keeps the int8 products from saturating on CPUs without VNNI (7-bit
  activations). PyTorch's weight-only kernel `torch._weight_int8pack_mm` exists in torch 2.13's
  CPU build but streams int8 weights at a fifth of the fp32 GEMV's bandwidth there, so it would
  make int8 slower than fp32.

Accuracy (README, "Correctness policy"): logits against the fp32 model by relative error,
greedy agreement over a short horizon, perplexity on held-out text within 1% of fp32
(`tests/test_quant.py` trains a tiny GPT-2 for that).
"""

from __future__ import annotations

import warnings

import torch

MODES = ("int8",)


def check_mode(quantize) -> None:
    """Raise ValueError unless `quantize` is None or one of `MODES`."""
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize must be None or one of {MODES}, got {quantize!r}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 quantisation of a weight.

    Parameters
    ----------
    w : (N, K) float tensor

    Returns
    -------
    q : (N, K) int8, values in [-127, 127]
    scale : (N,) fp32, `w ~= q * scale[:, None]`

    Examples
    --------
    >>> q, s = quantize_int8(torch.randn(4, 8))
    >>> (q.float() * s[:, None]).shape
    torch.Size([4, 8])
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8 takes a 2-D float weight (N, K), got {w.dtype} of shape "
                         f"{tuple(w.shape)}")
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # (N,)
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (N, K) an int8 copy stands for."""
    return q.float() * scale[:, None]


def _key(w: torch.Tensor):
    """What an int8 copy of `w` depends on, or None when `w` keeps no version counter."""
    try:
        version = w._version
    except RuntimeError:  # an inference tensor
        return None
    return (w.data_ptr(), version, w.device, w.dtype, tuple(w.shape))


class Int8Weight:
    """An int8 copy of one float weight, ready for the device's matmul.

    `q`, `scale`: see `quantize_int8`; `packed`: on the CPU, the weight prepacked for PyTorch's
    quantized engine (None on CUDA, where the Triton op reads `q` directly).
    """

    __slots__ = ("key", "q", "scale", "packed")

    def __init__(self, w: torch.Tensor, key):
        self.key = key
        # NOTE: normal tensors even when made inside inference mode (the forward paths run in
        # it): a refresh updates them in place, wherever it is called from.
        with torch.inference_mode(False):
            self.q, self.scale = quantize_int8(w)
        self.packed = _prepack_cpu(self.q, self.scale) if w.device.type == "cpu" else None


def _prepack_cpu(q: torch.Tensor, scale: torch.Tensor):
    # COMPAT(torch 2.13): quantized tensors (torch.quantize_per_channel and the qint8 dtype) are
    # deprecated with a warning; they remain the only way into the CPU int8 GEMM's prepacking.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def int8_weight(holder, w: torch.Tensor) -> Int8Weight:
    """`holder`'s int8 copy of `w` (kept on `holder._int8`), re-quantised when `w` changed."""
    key = _key(w)
    cached = holder._int8
    if key is not None and cached is not None and cached.key == key:
        return cached
    fresh = Int8Weight(w, key)
    if cached is not None and cached.q.shape == fresh.q.shape and cached.q.device == fresh.q.device:
        # NOTE: re-quantised into the same tensors: a captured CUDA graph holds their addresses
        cached.q.copy_(fresh.q)
        cached.scale.copy_(fresh.scale)
        cached.packed, cached.key = fresh.packed, key
        return cached
    holder._int8 = fresh if key is not None else None
    return fresh


def int8_linear_cpu(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ W.T + bias` on the CPU through PyTorch's int8 GEMM, every row quantised on its own
    range (see the module docstring). x: (..., K) float; returns (..., N) in x's dtype."""
    K = weight.q.shape[1]
    x2 = x.reshape(-1, K).float()
    r = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)  # (M, 1)
    y = torch.ops.quantized.linear_dynamic(x2 / r, weight.packed, True)  # (M, N) fp32
    y = torch.addcmul(bias.float(), y, r) if bias is not None else y.mul_(r)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[1])

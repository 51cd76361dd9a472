"""int8 weight quantisation: per-output-channel symmetric int8 copies of the linear weights.

`GPT2.from_pretrained(..., quantize="int8")` (or `from_config`) keeps the model's float
parameters as they are (the state dict, HF conversion and every other reader see no change) and
runs each block's four linears and the output head on int8 copies of their weights:

    scale[n] = max_k |W[n, k]| / 127          (fp32 rounded up to a bf16 value; an all-zero row gets 1)
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

How the matmul runs (weight-only: the activations are never quantised):

- CUDA: `gptfast.ops.int8_linear`, a Triton GEMV that reads the int8 weight and dequantises it in
  registers (the activations stay in the model's dtype): half the bytes of bf16.
- CPU: PyTorch's int8 weight kernel `torch._weight_int8pack_mm` (per-output-channel scales, the
  k-sum in fp32) with the activations in bf16: its bf16 kernel is vectorised (AVX-512) and reads
  the int8 weight at ~2-4x the speed of the fp32 GEMM on the float weight, while its fp32 and
  fp16 kernels are 3-35x slower than that GEMM (measured single-threaded on an AVX-512 Xeon,
  GPT-2 124M's decode shapes, batch 1 and 8). Its result is bf16 (rounding adds ~0.3% relative
  error to the ~0.8% of the int8 weights); the bias is added in the model's dtype. So that the
  kernel's bf16 scales are exact, every scale is rounded up to a bf16 value at quantisation
  (rounding up keeps `|W / scale| <= 127`).

Accuracy (README, "Correctness policy"): logits against the fp32 model by relative error,
greedy agreement over a short horizon, perplexity on held-out text within 1% of fp32
(`tests/test_quant.py` trains a tiny GPT-2 for that).
"""

from __future__ import annotations

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
    scale : (N,) fp32 holding bf16-representable values (rounded up), `w ~= q * scale[:, None]`

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
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # (N,) > 0
    # rounded up to the next bf16 value (the CPU kernel takes bf16 scales): clear the 16 low bits of
    # the fp32 pattern after adding 0xFFFF, which carries into the kept bits unless they are all zero
    bits = scale.view(torch.int32)
    scale = ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)
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

    `q`, `scale`: see `quantize_int8`; `scale_bf16`: on the CPU, `scale` in bf16 (exact, see
    `quantize_int8`) for `torch._weight_int8pack_mm`; None on CUDA, where the Triton op reads `q`
    and `scale` directly.
    """

    __slots__ = ("key", "q", "scale", "scale_bf16")

    def __init__(self, w: torch.Tensor, key):
        self.key = key
        # NOTE: normal tensors even when made inside inference mode (the forward paths run in
        # it): a refresh updates them in place, wherever it is called from.
        with torch.inference_mode(False):
            self.q, self.scale = quantize_int8(w)
            self.scale_bf16 = self.scale.to(torch.bfloat16) if w.device.type == "cpu" else None


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
        if cached.scale_bf16 is not None:
            cached.scale_bf16.copy_(fresh.scale_bf16)
        cached.key = key
        return cached
    holder._int8 = fresh if key is not None else None
    return fresh


def int8_linear_cpu(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T + bias` on the CPU through `torch._weight_int8pack_mm` (see the
    module docstring): x in bf16, the k-sum in fp32, the bias added in its own dtype.

    Parameters
    ----------
    x : (..., K) float
    weight : Int8Weight of a (N, K) weight, made on the CPU
    bias : (N,) or None

    Returns
    -------
    (..., N) in x's dtype.
    """
    K = weight.q.shape[1]
    x2 = x.reshape(-1, K).to(torch.bfloat16)
    y = torch._weight_int8pack_mm(x2, weight.q, weight.scale_bf16)  # (M, N) bf16
    y = torch.add(bias, y) if bias is not None else y  # promotes to the bias dtype (fp32 model: fp32)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[1])

"""int8 weight quantisation: per-output-channel symmetric int8 copies of the linear weights.

`GPT2.from_pretrained(..., quantize="int8")` (or `from_config`) keeps the model's float
parameters as they are (the state dict, HF conversion and every other reader see no change) and
runs each block's four linears and the output head on int8 copies of their weights:

    scale[n] = max_k |W[n, k]| / 127          (fp32; an all-zero row gets 1)
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

- CUDA: `gptfast.ops.int8_linear`, a Triton GEMV that reads the int8 weight `q` and dequantises it
  in registers (the activations stay in the model's dtype): half the bytes of bf16.
- CPU: `gptfast.ops.cpu_linear`, a C++ kernel that streams the int8 weight, kept in its panel
  layout (`panels`, no row-major copy), widens it to fp32 in registers and sums in fp32 with the
  activations in fp32: every row of the batch is computed exactly as it would be alone.

Accuracy (README, "Correctness policy"): logits against the fp32 model by relative error,
greedy agreement over a short horizon, perplexity on held-out text within 1% of fp32
(`tests/test_quant.py` trains a tiny GPT-2 for that).
"""

from __future__ import annotations

import torch

from .ops import cpu_linear
from .ops.common import on_cuda

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
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # (N,) > 0
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
    """An int8 copy of one float weight (N, K), laid out for the device's matmul.

    `scale`: (N,) fp32, see `quantize_int8`. On CUDA `q` is the (N, K) int8 weight the Triton op
    reads and `panels` is None; on the CPU `panels` is `q` in `ops.cpu_linear`'s panel layout and
    `q` is None (one int8 copy per weight either way).
    """

    __slots__ = ("key", "q", "panels", "scale", "n")

    def __init__(self, w: torch.Tensor, key):
        self.key = key
        self.n = w.shape[0]
        # NOTE: normal tensors even when made inside inference mode (the forward paths run in
        # it): a refresh updates them in place, wherever it is called from.
        with torch.inference_mode(False):
            q, self.scale = quantize_int8(w)
            if on_cuda(w.device):  # CUDA, or CPU tensors standing in for it (`ops.as_cuda`)
                self.q, self.panels = q, None
            else:
                self.q, self.panels = None, cpu_linear.pack_panels(q)

    def stored(self) -> torch.Tensor:
        """The int8 tensor this copy keeps: `q` or `panels`."""
        return self.q if self.q is not None else self.panels

    def int8(self) -> torch.Tensor:
        """The (N, K) int8 weight, whatever the layout."""
        return self.q if self.q is not None else cpu_linear.unpack_panels(self.panels, self.n)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (N, K) this copy stands for."""
        return dequantize_int8(self.int8(), self.scale)


def int8_weight(holder, w: torch.Tensor) -> Int8Weight:
    """`holder`'s int8 copy of `w` (kept on `holder._int8`), re-quantised when `w` changed."""
    key = _key(w)
    if key is not None:
        key += (on_cuda(w.device),)  # the layout: `q` for the Triton op, `panels` for the CPU kernel
    cached = holder._int8
    if key is not None and cached is not None and cached.key == key:
        return cached
    fresh = Int8Weight(w, key)
    if cached is not None and cached.n == fresh.n and cached.stored().shape == fresh.stored().shape and \
            cached.stored().device == fresh.stored().device:
        # NOTE: re-quantised into the same tensors: a captured CUDA graph holds their addresses
        cached.stored().copy_(fresh.stored())
        cached.scale.copy_(fresh.scale)
        cached.key = key
        return cached
    holder._int8 = fresh if key is not None else None
    return fresh


def int8_linear_cpu(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T + bias` on the CPU through `ops.cpu_linear` (see the module
    docstring): the activations, products and sums in fp32, the result in x's dtype.

    Parameters
    ----------
    x : (..., K) float
    weight : Int8Weight of a (N, K) weight, made on the CPU
    bias : (N,) or None

    Returns
    -------
    (..., N) in x's dtype.
    """
    K = weight.panels.shape[1]
    if x.shape[-1] != K or x.device.type != "cpu" or (bias is not None and bias.shape != (weight.n,)):
        raise ValueError(f"int8 linear: x [..., {K}] and bias [{weight.n}] on the CPU expected, got x "
                         f"{tuple(x.shape)} on {x.device}, bias {None if bias is None else tuple(bias.shape)}")
    x2 = x.reshape(-1, K)
    if x2.dtype is not torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    fused = bias is not None and bias.dtype is torch.float32 and bias.is_contiguous() and bias.device.type == "cpu"
    # every operand is built here or by `Int8Weight` as the kernel needs it: no per-call checks
    y = cpu_linear.cpu_linear(x2, weight.panels, weight.n, weight.scale, bias if fused else None,
                              check=False)  # (M, N) fp32
    if bias is not None and not fused:
        y = y.add_(bias)
    return y.to(x.dtype).view(*x.shape[:-1], weight.n)

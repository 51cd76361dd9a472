"""Launcher argument checks shared by the ops.

A Triton launcher checks its arguments before it launches: a kernel reads raw pointers, so a
wrong shape, dtype or stride is not an error there but a wrong answer or a fault. Each check
raises with the op's name, the argument, the value it got and what is allowed. The checks of one
op alone stay in its file; the ones several ops share live here.
"""

from __future__ import annotations

import math

import torch

from .common import interpreting, on_cuda

# dtypes of activations, weights and K/V caches every op accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the attention kernels hold a head's [D] row in registers (one BLOCK_D tile)
MAX_HEAD_DIM = 256


def check_triton_device(name: str, device: torch.device) -> None:
    """A Triton kernel can run on `device`: CUDA (or inside `as_cuda`), or the CPU under Triton's
    interpreter (`TRITON_INTERPRET=1`)."""
    if not on_cuda(device) and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got device {device}; use {name}_ref on the CPU"
        )


def check_launch_device(name: str, *tensors: torch.Tensor | None) -> torch.device:
    """The tensors (None entries skipped) share one device, on which a Triton kernel can run;
    returns it."""
    given = [t for t in tensors if t is not None]
    device = given[0].device
    for t in given[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    check_triton_device(name, device)
    return device


def check_same_device(name: str, **tensors: torch.Tensor | None) -> torch.device:
    """The named tensors (None values skipped) share one device; returns it. The error names the
    first argument and the one on another device."""
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first, device = named[0][0], named[0][1].device
    for arg, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device; {first} is on {device}, {arg} on {t.device}")
    return device


def check_vector(name: str, arg: str, t, n: int, dtype: torch.dtype, dim: str | None = None) -> None:
    """`t` is None or a 1-D [n] tensor of `dtype` with unit stride; `dim` names the size in the
    message ("C" gives "[C=768]")."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        size = n if dim is None else f"{dim}={n}"
        raise ValueError(f"{name}: {arg} must be 1-D [{size}], got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: {arg} dtype {t.dtype} differs from the input's dtype {dtype}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name}: {arg} must be contiguous (stride 1), got stride {t.stride(0)}")


def check_int_vector(name: str, arg: str, t: torch.Tensor, length: int, dtype: torch.dtype) -> None:
    """`t` is a 1-D integer tensor [length] of exactly `dtype` (any stride)."""
    if t.dtype != dtype or t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{name}: {arg} must be a 1-D {dtype} tensor of length {length}, "
            f"got {t.dtype} shape {tuple(t.shape)}"
        )


def check_eps(name: str, eps) -> float:
    """A LayerNorm epsilon: a finite Python number >= 0; returned as a float."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"{name}: eps must be a finite Python float >= 0, got {eps!r}")
    return float(eps)


def check_scale(name: str, scale) -> float:
    """An attention score scale: a finite Python number; returned as a float."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite Python float, got {scale!r}")
    return float(scale)


def check_paged_cache(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      qname: str = "q") -> None:
    """q [tokens, H, D] (called `qname` in errors; unit last stride) against the paged caches
    k_cache/v_cache [num_blocks, block_size, H, D] (contiguous, q's dtype)."""
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: {qname} dtype must be one of {FLOAT_DTYPES}, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"{name}: {qname} must be 3-D [tokens, H, D], got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError(f"{name}: {qname}'s last dimension must be contiguous (stride 1), got strides {q.stride()}")
    H, D = q.shape[1], q.shape[2]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be in 1..{MAX_HEAD_DIM}, got {D}")
    for cname, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[2] != H or c.shape[3] != D:
            raise ValueError(
                f"{name}: {cname} must be [num_blocks, block_size, H={H}, D={D}], got shape {tuple(c.shape)}"
            )
        if c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"{name}: {cname} needs num_blocks >= 1 and block_size >= 1, got shape {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise ValueError(f"{name}: {cname} dtype {c.dtype} differs from {qname} dtype {q.dtype}")
        if not c.is_contiguous():
            raise ValueError(f"{name}: {cname} must be contiguous, got strides {c.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")


def check_block_tables(name: str, block_tables: torch.Tensor, batch: int) -> None:
    """block_tables is int32 [batch, max_blocks] with contiguous rows."""
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"{name}: block_tables must be int32 [B={batch}, max_blocks], "
            f"got {block_tables.dtype} shape {tuple(block_tables.shape)}"
        )
    if block_tables.shape[1] > 0 and block_tables.stride(1) != 1:
        raise ValueError(f"{name}: block_tables rows must be contiguous, got strides {block_tables.stride()}")


def check_rows(name: str, arg: str, t, K: int | None = None, dtype: torch.dtype | None = None) -> None:
    """`t` is 2-D [rows, K] (any K when None) with a contiguous last dimension (any row stride),
    of one of FLOAT_DTYPES, or of exactly `dtype` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: {arg} must be 2-D [rows, {'C' if K is None else K}], got shape {tuple(t.shape)}")
    if K is not None and t.shape[1] != K:
        raise ValueError(f"{name}: {arg} must have {K} columns, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: {arg} dtype must be one of {FLOAT_DTYPES}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: {arg} dtype {t.dtype} differs from the input's dtype {dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: {arg}'s last dimension must be contiguous (stride 1), got strides {t.stride()}")

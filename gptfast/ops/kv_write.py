"""`kv_cache_write`: store the K/V rows of N new tokens into their paged-cache slots.

What it computes: `k_cache.view(-1, H, D)[slot_mapping[n]] = k[n]` (and the same for v), for
every token n whose slot is not negative (the layout is described in `paged`).

Why a kernel: the slots are scattered (one per token, wherever the block manager put the
sequence's pages), and the K/V rows arrive as strided views of the fused QKV projection; one
launch writes both caches straight from those views, with no copy to make them contiguous and
no host sync (a negative slot is skipped on the device), so it can be captured in a CUDA graph.

Kernel and floor: grid `(N,)`, one program per token writes its `[H, D]` K and V rows to their
slot. Bytes: 4 * N * H * D * e (read k and v, write two cache rows). Pure bandwidth. The fused
decode step does this write inside `decode_attention` (its append) instead; prefill and the
unfused path call this op.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_int_vector, check_launch_device, check_paged_cache

# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _kv_cache_write_kernel(
    k_cache_ptr,  # [num_blocks * block_size, H, D] contiguous, the cache's dtype; row `slot` written
    v_cache_ptr,  # [num_blocks * block_size, H, D] contiguous, like k_cache; row `slot` written
    k_ptr,  # [N, H, D] fp16/bf16/fp32, strides (stride_kn, stride_kh, 1)
    v_ptr,  # [N, H, D] k's dtype, strides (stride_vn, stride_vh, 1)
    slot_ptr,  # [N] int64, slot per token; negative: skip the token
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cache_slot,
    stride_cache_h,
    H,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n)  # int64; negative means "do not cache this token"
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < HEAD_DIM)
        # k, v: [N, H, D] (any token/head stride, unit last stride)
        k = tl.load(k_ptr + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        # k_cache: [num_blocks * block_size, H, D] row `slot`
        dst = slot * stride_cache_slot + offs_h[:, None] * stride_cache_h + offs_d[None, :]
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def kv_cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the K/V rows of N tokens into their paged-cache slots, in place (Triton).

    Parameters
    ----------
    k, v : Tensor [N, H, D]
        fp16/bf16/fp32 (the cache's dtype), last dimension contiguous (token and head strides
        are free, so the views out of a fused QKV projection need no copy).
    k_cache, v_cache : Tensor [num_blocks, block_size, H, D]
        Contiguous; written in place.
    slot_mapping : Tensor [N], int64
        `block_id * block_size + offset` per token; a negative slot skips the token (e.g. a
        padding token). Slots must be distinct and below `num_blocks * block_size`.

    Examples
    --------
    >>> kv_cache_write(k, v, k_cache, v_cache, slot_mapping)  # k_cache.view(-1, H, D)[slot] = k
    """
    name = "kv_cache_write"
    check_paged_cache(name, k, k_cache, v_cache, qname="k")
    if v.shape != k.shape or v.dtype != k.dtype or v.stride(-1) != 1:
        raise ValueError(
            f"{name}: v must match k's shape {tuple(k.shape)} and dtype {k.dtype} with a contiguous last "
            f"dimension, got {tuple(v.shape)} {v.dtype} strides {v.stride()}"
        )
    N, H, D = k.shape
    check_int_vector(name, "slot_mapping", slot_mapping, N, torch.int64)
    check_launch_device(name, k, v, k_cache, v_cache, slot_mapping)
    if N == 0:
        return
    _kv_cache_write_kernel[(N,)](
        k_cache, v_cache, k, v, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        H,
        HEAD_DIM=D,
        BLOCK_H=triton.next_power_of_2(H),
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# reference (eager PyTorch; the CPU path of the runtime)
# --------------------------------------------------------------------------------------------


def kv_cache_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Eager reference of `kv_cache_write` (same signature): `cache.view(-1, H, D)[slot] = k`."""
    H, D = k_cache.shape[2], k_cache.shape[3]
    if slot_mapping.device.type == "cpu" and bool((slot_mapping >= 0).all()):
        slots = slot_mapping  # the runtime's case: no padding slots, no masking copies
    else:
        keep = slot_mapping >= 0
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    # caches viewed as [num_blocks * block_size, H, D]: a slot is a row
    k_cache.view(-1, H, D).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, H, D).index_copy_(0, slots, v.to(v_cache.dtype))

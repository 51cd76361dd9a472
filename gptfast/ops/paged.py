"""The paged K/V layout and the attention math that `kv_cache_write`, `prefill_attention` and
`decode_attention` share, with the two helpers of their eager references.

Layout: the K/V cache of one layer is paged. `k_cache`, `v_cache` are
`[num_blocks, block_size, H, D]`, contiguous, and the token at position p of sequence b lives at
slot `block_tables[b, p // block_size] * block_size + p % block_size`. Because the cache is
contiguous, a slot s is the row `s` of the cache viewed as `[num_blocks * block_size, H, D]`.
Block 0 is the null block: the block manager never hands it to a sequence.

Math (per sequence b, head h; positions count from 0 over the whole sequence, cached prefix
included)::

    S[i, j] = scale * <q_i, k_j>                     for key positions j <= pos(i) < seq_len
    out_i   = sum_j softmax_j(S[i, :]) v_j

The kernels compute the softmax online (flash attention): per query row a running max m, running
sum l and an unnormalised fp32 accumulator, rescaled by exp(m_old - m_new) whenever the max
grows. They work in base 2 (`exp2`) with `scale * log2(e)` folded into q or the scores. Every
path accumulates in fp32; scores of masked keys are -inf; a row with no valid key (a decode row
with seq_len 0) outputs zeros, never NaN.

Floors in the ops' docstrings use e = bytes per element (2 for fp16/bf16) and an H100's measured
ceilings: ~3.0 TB/s copy bandwidth, ~790 TFLOP/s bf16 matmul.

References: Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023) for the tiled
online softmax; Dao et al., "Flash-Decoding for long-context inference" (2023) for split-KV with
a log-sum-exp merge; Kwon et al., "Efficient Memory Management for LLM Serving with
PagedAttention" (vLLM, 2023) for the paged layout; Triton tutorial 06 (fused attention) for the
structure of the prefill kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634  # the kernels score in base 2: scale * log2(e) folded into q or the scores


def gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, H, D] and pages [..., P] -> [..., P * bs, H, D] (token order)."""
    # index_select on the flattened page ids: faster than advanced indexing on CPU
    g = cache.index_select(0, pages.reshape(-1).long())  # [prod(...) * P, bs, H, D]
    return g.view(*pages.shape[:-1], pages.shape[-1] * cache.shape[1], cache.shape[2], cache.shape[3])


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Masked softmax attention in fp32: q [B, H, Q, D], k/v [B, H, K, D], visible [B, 1, Q, K].

    Rows with no visible key give zeros (not NaN). Computed by PyTorch's fused CPU/CUDA
    attention on fp32 inputs: the same math as softmax(q k^T * scale) v, without materialising
    the probabilities, which keeps the CPU path of the runtime fast.
    """
    empty = ~visible.any(dim=-1, keepdim=True)  # [B, 1, Q, 1]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible | empty,
                                         scale=scale)
    return out.masked_fill(empty, 0.0)

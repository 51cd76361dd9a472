"""The paged KV cache: K/V tensors in fixed-size blocks, and the Python face of the C++ manager.

Layout, per layer: `k[layer]`, `v[layer]`: `[num_blocks, block_size, n_head, head_dim]`.
A sequence's token at position p lives in block `block_table[p // block_size]`, row
`p % block_size`; its slot id is `block_id * block_size + p % block_size`. Block 0 is the null
block: it never holds a sequence's data and pads every block table.

Which blocks a sequence owns, prefix sharing (chained hashes over full blocks), forks with
copy-on-write and LRU eviction are decided by `gptfast._C.BlockManager` (csrc/); this module owns
the tensors and turns the manager's answers into the per-step metadata the attention ops read.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

import torch

from .config import GPT2Config

# Default pool size on the CPU: room for this many full-length sequences, within a byte budget.
_CPU_SEQUENCES = 8
_CPU_BYTES = 2 << 30
# On CUDA: this fraction of the memory free once the weights are loaded, and no more than
# this many full-length sequences (enough for a 256-request continuous batch).
_CUDA_FRACTION = 0.4
_CUDA_SEQUENCES = 256


@dataclass
class AttnMetadata:
    """What every layer's attention needs for one step, computed once per step.

    slot_mapping : (N,) int64, where each new token's K/V is written (negative: skip).
    block_tables : (B, max_blocks) int32, each sequence's blocks, padded with the null block 0.
    seq_lens : (B,) int32, each sequence's K/V length after this step's tokens are written.
    cu_seqlens_q : (B + 1,) int32, prefill only: sequence b's new tokens are rows
        cu_seqlens_q[b]:cu_seqlens_q[b + 1] of the flattened batch.
    max_seqlen_q : the longest new-token run (prefill; 1 for decode).
    is_decode : one new token per sequence.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None
    max_seqlen_q: int
    is_decode: bool


def kv_bytes_per_token(config: GPT2Config, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes in the cache, over all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * config.n_embd * elem


def default_num_blocks(config: GPT2Config, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """A sensible pool size (null block included) for `device`."""
    per_block = kv_bytes_per_token(config, dtype) * block_size
    per_sequence = -(-config.n_positions // block_size)  # blocks for one full-length sequence
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        blocks = int(free * _CUDA_FRACTION) // per_block
        blocks = min(blocks, _CUDA_SEQUENCES * per_sequence)
    else:
        blocks = min(_CPU_SEQUENCES * per_sequence, _CPU_BYTES // per_block)
    # Always room for at least two full-length sequences, so any single request fits.
    return max(blocks, 2 * per_sequence) + 1


class KVCache:
    """Paged K/V tensors for every layer plus the block manager that hands out their blocks.

    Parameters
    ----------
    config : GPT2Config
    block_size : int
        Tokens per block.
    num_blocks : int or None
        Blocks in the pool, the null block included; None: `default_num_blocks`.
    dtype, device :
        Of the K/V tensors (the model's).
    enable_prefix_caching : bool
        Share the blocks of identical prompt prefixes between sequences.
    """

    def __init__(self, config: GPT2Config, block_size: int = 16, num_blocks: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 enable_prefix_caching: bool = True):
        from . import _C

        device = torch.device(device)
        if num_blocks is None:
            num_blocks = default_num_blocks(config, block_size, dtype, device)
        self.config = config
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        shape = (config.n_layer, num_blocks, block_size, config.n_head, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, blocks, bs, H, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, blocks, bs, H, D]
        self.manager = _C.BlockManager(num_blocks, block_size, enable_prefix_caching)
        self._seq_ids = itertools.count()
        # NOTE: every Engine on this cache takes this lock for each step, add, cancel and abort:
        # the block manager, the K/V tensors and the model's decode-graph buffers are shared, and
        # a prompt's blocks become prefix-cache hits for other engines only once the step that
        # allocated them has written their K/V (admission and prefill are one locked step).
        self.lock = threading.RLock()
        self.engines: weakref.WeakSet = weakref.WeakSet()  # the schedulers of the live engines sharing it
        # The weights the cached prefixes were computed from (an Engine's fingerprint of them);
        # None: unknown, so no cached prefix is trusted.
        self.weights_fingerprint: tuple | None = None

    def new_sequence_ids(self, n: int) -> range:
        """`n` consecutive sequence ids unused in this cache's manager (shared by every engine on
        the model)."""
        with self.lock:
            start = next(self._seq_ids)
            if n > 1:
                self._seq_ids = itertools.count(start + n)
            return range(start, start + n)

    @property
    def total_blocks(self) -> int:
        """Usable blocks (the null block not counted)."""
        return self.manager.total_blocks

    def stats(self) -> dict:
        """Pool occupancy: total_blocks, free_blocks (cached-but-unused blocks count as free),
        used_blocks, cached_blocks, prefix_hit_tokens (cumulative), running_sequences,
        block_size, bytes (of the K/V tensors)."""
        m = self.manager
        free = m.num_free_blocks()
        return {
            "total_blocks": m.total_blocks,
            "free_blocks": free,
            "used_blocks": m.total_blocks - free,
            "cached_blocks": m.num_cached_blocks(),
            "prefix_hit_tokens": m.prefix_hit_tokens,
            "running_sequences": m.num_sequences(),
            "block_size": self.block_size,
            "bytes": 2 * self.k.numel() * self.k.element_size(),
        }

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        """Copy-on-write: copy K/V of block src into block dst, in every layer.

        pairs : (n, 2) integer tensor of (src, dst) block ids.
        """
        if pairs.numel() == 0:
            return
        pairs = pairs.to(device=self.device, dtype=torch.long)
        src, dst = pairs[:, 0], pairs[:, 1]
        self.k[:, dst] = self.k[:, src]  # [L, n, bs, H, D]
        self.v[:, dst] = self.v[:, src]

    def check_weights(self, fingerprint: tuple | None) -> bool:
        """Whether the cached prefixes were computed from the weights `fingerprint` identifies
        (see `gptfast.engine.weights_fingerprint`). If not, or if `fingerprint` is None (weights
        that cannot be identified), every cached prefix is dropped and `fingerprint` recorded as
        the weights the prefixes cached from now on come from."""
        if fingerprint is not None and fingerprint == self.weights_fingerprint:
            return True
        self.manager.reset_prefix_cache()
        self.weights_fingerprint = fingerprint
        return False

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, so that no later prompt reuses K/V computed before now
        (needed after weights change in a way PyTorch's version counters do not see)."""
        self.manager.reset_prefix_cache()

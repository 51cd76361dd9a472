"""Step batches: the typed hand-off from the scheduler to the model, the graph runner and the sampler.

The scheduler chooses the sequences of a step and gives their new tokens KV slots; the builders
here turn them into flat host arrays (numpy, int64/int32/fp32), which the model runs on
(`PrefillBatch.model_inputs`, `DecodeBatch.model_inputs`) or the graph runner copies into its
static buffers (`DecodeGraphRunner.load`).

Token layout of one sequence whose first `num_cached_tokens` K/V are in the cache:

    |<------------------- len(tokens) ------------------->|
    |<-- num_cached_tokens -->|<------ computed now ------>|
    |  K/V in the cache       | prefill: every new token   |
    |  (the prefix cache or   | decode: the newest token   |
    |   earlier steps)        |  (cached == len - 1)       |
                              ^ positions start here; each computed token gets a slot

A prefill batch flattens the computed tokens of B sequences with no padding; cu_seqlens marks
where each sequence's run starts, and the logits are taken at each run's last token:

    token_ids     [a3 a4 a5 | b0 b1 | c7 c8 c9 c10]       N = 9 tokens
    positions     [ 3  4  5 |  0  1 |  7  8  9  10]
    cu_seqlens    [0, 3, 5, 9]                            B + 1
    seq_lens      [6, 2, 11]                              cached + new, per sequence
    logits_rows   [2, 4, 8]                               cu_seqlens[1:] - 1

A decode batch has one token per sequence: token_ids[i] is sequence i's newest token, at
positions[i] = seq_lens[i] - 1, and the step draws the token of index `offsets[i]` (the count
generated so far). block_tables[i, j] is the j-th block of sequence i (0, the null block, past
its last one); a slot is `block * block_size + position % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kv_cache import AttnMetadata
from .sequence import Sequence


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device` (the array itself on the CPU: no copy)."""
    t = torch.from_numpy(array)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def block_tables(manager, seq_ids: np.ndarray, longest: int) -> np.ndarray:
    """The block tables of `seq_ids`, [B, ceil(longest / block_size)] int32, 0 past each one's end.

    NOTE: the width is the longest sequence's, so the CPU references never gather more K/V than
    the longest sequence holds.
    """
    tables = np.empty((len(seq_ids), -(-longest // manager.block_size)), dtype=np.int32)
    manager.block_tables(seq_ids, tables)
    return tables


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """The uncached prompt tokens of B sequences as one flat batch (see the module docstring).

    seqs : the B sequences, in batch order (empty where the caller tracks its rows itself: the
        beam search)
    token_ids, positions, slot_mapping : [N] int64
    cu_seqlens : [B + 1] int32; seq_lens : [B] int32
    block_tables : [B, ceil(max(seq_lens) / block_size)] int32
    max_new : the longest run of computed tokens (attention's max query length)
    """

    seqs: list[Sequence]
    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    cu_seqlens: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    max_new: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def model_inputs(self, device: torch.device):
        """(token_ids, positions, attention metadata, logits_rows) on `device`, for
        `GPT2.forward_paged`; logits_rows [B] int64 are the rows whose logits come back."""
        meta = AttnMetadata(
            slot_mapping=to_device(self.slot_mapping, device),
            block_tables=to_device(self.block_tables, device),
            seq_lens=to_device(self.seq_lens, device),
            cu_seqlens_q=to_device(self.cu_seqlens, device),
            max_seqlen_q=self.max_new,
            is_decode=False,
        )
        last = to_device(self.cu_seqlens[1:].astype(np.int64) - 1, device)
        return to_device(self.token_ids, device), to_device(self.positions, device), meta, last


def build_prefill(manager, seqs: list[Sequence]) -> PrefillBatch:
    """The prefill batch of `seqs`: each one's tokens from `num_cached_tokens` on (their blocks
    are allocated)."""
    starts = [s.num_cached_tokens for s in seqs]
    lens = [len(s.tokens) for s in seqs]
    n_new = [n - c for n, c in zip(lens, starts)]
    total = sum(n_new)
    tokens = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    slots = np.empty(total, dtype=np.int64)
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(n_new, out=cu[1:])
    for i, s in enumerate(seqs):
        a, b = cu[i], cu[i + 1]
        tokens[a:b] = s.tokens[starts[i]:]
        positions[a:b] = np.arange(starts[i], lens[i])
        manager.slot_mapping(s.seq_id, starts[i], lens[i], slots[a:b])
    ids = np.fromiter((s.seq_id for s in seqs), dtype=np.int64, count=len(seqs))
    return PrefillBatch(seqs, tokens, positions, slots, cu, np.asarray(lens, dtype=np.int32),
                        block_tables(manager, ids, max(lens)), max(n_new))


@dataclass(frozen=True, slots=True, eq=False)
class SamplingRows:
    """The per-sequence sampling constants of a decode batch, built once per batch composition
    (an engine reuses them while its running sequences stay the same).

    seqs : the sequences, in batch order
    seeds : [B] int64 Philox keys; temperature : [B] fp32 (0 for greedy rows)
    top_k : [B] int32 (0: off); top_p : [B] fp32 (1: off)
    eager_processing : whether a row needs logits processors that run eagerly (the graph step
        then stops at the logits)
    min_new : [B] int64 each row's min_new_tokens where it has EOS ids to mask, else 0; None
        when no row ever masks EOS
    """

    seqs: list[Sequence]
    seeds: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    eager_processing: bool
    min_new: np.ndarray | None

    @classmethod
    def of(cls, seqs: list[Sequence]) -> SamplingRows:
        min_new = np.array([s.params.min_new_tokens if s.params.eos_token_ids else 0 for s in seqs],
                           dtype=np.int64)
        return cls(
            list(seqs),
            np.array([s.seed for s in seqs], dtype=np.int64),
            np.array([s.params.temperature if s.params.do_sample else 0.0 for s in seqs], dtype=np.float32),
            np.array([s.params.top_k for s in seqs], dtype=np.int32),
            np.array([s.params.top_p for s in seqs], dtype=np.float32),
            any(s.params.eager_processing for s in seqs),
            min_new if min_new.any() else None,
        )

    def eos_masked(self, offsets: np.ndarray) -> bool:
        """Whether a row drawing token index `offsets[i]` still has its EOS ids masked."""
        return self.min_new is not None and bool((offsets < self.min_new).any())


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """One token of each of B running sequences (see the module docstring).

    seqs : the B sequences, in batch order (empty where the caller tracks its rows itself: the
        beam search); seq_ids : [B] int64
    token_ids, positions : [B] int64 each row's newest token and its position
    slot_mapping : [B] int64 where its K/V go, or None when the block manager already holds the
        tokens (the graph step derives the slots from the block tables)
    seq_lens : [B] int32; block_tables : [B, ceil(max(seq_lens) / block_size)] int32
    offsets : [B] int64 the index of the token each row draws (its Philox offset)
    sampling : the rows' `SamplingRows`, or None for a step that draws nothing on the device
        (eager sampling, the beam search)
    """

    seqs: list[Sequence]
    seq_ids: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray | None
    seq_lens: np.ndarray
    block_tables: np.ndarray
    offsets: np.ndarray
    sampling: SamplingRows | None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def needs_logits(self) -> bool:
        """Whether the logits processors must see this step's logits before the draw."""
        rows = self.sampling
        return rows is None or rows.eager_processing or rows.eos_masked(self.offsets)

    def model_inputs(self, device: torch.device):
        """(token_ids, positions, attention metadata) on `device`, for `GPT2.forward_paged`."""
        meta = AttnMetadata(
            slot_mapping=to_device(self.slot_mapping, device),
            block_tables=to_device(self.block_tables, device),
            seq_lens=to_device(self.seq_lens, device),
            cu_seqlens_q=None,
            max_seqlen_q=1,
            is_decode=True,
        )
        return to_device(self.token_ids, device), to_device(self.positions, device), meta


def newest_tokens(seqs: list[Sequence]) -> np.ndarray:
    """Each sequence's newest token (a decode step's input), [B] int64."""
    return np.fromiter((s.tokens[-1] for s in seqs), dtype=np.int64, count=len(seqs))


def build_decode(manager, seqs: list[Sequence], seq_ids: np.ndarray, token_ids: np.ndarray,
                 slot_mapping: np.ndarray | None, sampling: SamplingRows | None) -> DecodeBatch:
    """The decode batch of `seqs` (ids `seq_ids`, inputs `token_ids`, slots from the scheduler's
    `append_slots` or None); `sampling` is `SamplingRows.of(seqs)` or None."""
    B = len(seqs)
    lens = np.fromiter((len(s.tokens) for s in seqs), dtype=np.int32, count=B)
    offsets = np.fromiter((s.num_generated for s in seqs), dtype=np.int64, count=B)
    return DecodeBatch(seqs, seq_ids, token_ids, lens.astype(np.int64) - 1, slot_mapping, lens,
                       block_tables(manager, seq_ids, int(lens.max())), offsets, sampling)

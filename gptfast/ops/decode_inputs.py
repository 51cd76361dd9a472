"""Decode-step inputs on the device: advance a row by its sampled token, then find its K/V slot.

The first kernel of a graphed decode step (gptfast/graphs.py). For each row r of the batch, in
place on the step's static buffers:

    live     = seq_lens[r] > 0                       (padding rows have seq_len 0 and stay padding)
    if live and advance[r]:                          (the step continues the previous one)
        tokens[r]    = max(sampled[r], 0)            (a flagged row's -1 becomes 0: the host drops
                                                      that row's output, the embedding never reads
                                                      out of bounds)
        positions[r] += 1;  seq_lens[r] += 1;  offsets[r] += 1
    p        = positions[r]
    block    = block_tables[r, p // block_size]      (0, the null block, where the host reserved none)
    slot[r]  = block * block_size + p % block_size   if live and block != 0, else -1 (no K/V write)
    advance[r] = live

So a step launched right after another, without any host upload, feeds the previous step's
sampled tokens back and writes its K/V where the block table says; the host only names a new
block in the table when a row crosses a block boundary. A step the host filled uploads
advance = 0 and its own tokens/positions/lengths; the slot is derived from the block table the
same way the block manager derives it, so the result is the manager's slot.

Bytes moved: ~45 bytes per row (a few int loads and stores, one block-table entry), one program
for the whole batch: the cost is the launch, ~2 µs.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins where Triton is not installed
from .checks import check_triton_device


@triton.jit
def _decode_inputs_kernel(
    tokens_ptr,  # [B] int64 contiguous; read and written
    positions_ptr,  # [B] int64 contiguous; read and written
    seq_lens_ptr,  # [B] int32 contiguous; read and written (0: a padding row)
    offsets_ptr,  # [B] int64 contiguous; read and written
    slot_ptr,  # [B] int64 contiguous; written: the K/V slot, -1 for none
    advance_ptr,  # [B] int32 contiguous; read and written
    sampled_ptr,  # [B] int64 contiguous: the previous step's draws
    tables_ptr,  # [B, max_blocks] int32, row stride table_stride, unit column stride
    table_stride,
    B,
    max_blocks,
    block_size,
    BLOCK: tl.constexpr,
):
    rows = tl.arange(0, BLOCK)
    m = rows < B
    lens = tl.load(seq_lens_ptr + rows, mask=m, other=0)
    live = m & (lens > 0)
    step = live & (tl.load(advance_ptr + rows, mask=m, other=0) != 0)
    tok = tl.load(tokens_ptr + rows, mask=m, other=0)
    new_tok = tl.maximum(tl.load(sampled_ptr + rows, mask=step, other=0), 0)
    tok = tl.where(step, new_tok, tok)
    inc = step.to(tl.int32)
    pos = tl.load(positions_ptr + rows, mask=m, other=0) + inc
    lens = lens + inc
    off = tl.load(offsets_ptr + rows, mask=m, other=0) + inc
    col = pos // block_size
    in_table = live & (col < max_blocks)
    block = tl.load(tables_ptr + rows.to(tl.int64) * table_stride + col, mask=in_table, other=0).to(tl.int64)
    slot = tl.where(in_table & (block != 0), block * block_size + pos % block_size, -1)
    tl.store(tokens_ptr + rows, tok, mask=m)
    tl.store(positions_ptr + rows, pos, mask=m)
    tl.store(seq_lens_ptr + rows, lens, mask=m)
    tl.store(offsets_ptr + rows, off, mask=m)
    tl.store(slot_ptr + rows, slot, mask=m)
    tl.store(advance_ptr + rows, live.to(tl.int32), mask=m)


_DTYPES = {"tokens": torch.int64, "positions": torch.int64, "seq_lens": torch.int32,
           "offsets": torch.int64, "slot_mapping": torch.int64, "advance": torch.int32,
           "sampled": torch.int64}


def _check(tokens, positions, seq_lens, offsets, slot_mapping, advance, sampled, block_tables, block_size):
    B = tokens.shape[0] if isinstance(tokens, torch.Tensor) else None
    named = {"tokens": tokens, "positions": positions, "seq_lens": seq_lens, "offsets": offsets,
             "slot_mapping": slot_mapping, "advance": advance, "sampled": sampled}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != _DTYPES[name] or t.shape != (B,) or (t.numel() and t.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous [B] = ({B},) {_DTYPES[name]} tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if t.device != tokens.device:
            raise ValueError(f"{name} is on {t.device} but tokens are on {tokens.device}")
    if (not isinstance(block_tables, torch.Tensor) or block_tables.dtype != torch.int32
            or block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.stride(1) != 1):
        is_tensor = isinstance(block_tables, torch.Tensor)
        got = (tuple(block_tables.shape), block_tables.dtype) if is_tensor else block_tables
        raise ValueError(f"block_tables must be an int32 [B = {B}, max_blocks] tensor with unit column "
                         f"stride, got {got}")
    if block_tables.device != tokens.device:
        raise ValueError(f"block_tables is on {block_tables.device} but tokens are on {tokens.device}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def decode_inputs_(tokens: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                   offsets: torch.Tensor, slot_mapping: torch.Tensor, advance: torch.Tensor,
                   sampled: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """Advance the rows flagged in `advance` by their sampled token and write every row's K/V slot,
    in place (Triton, one program; see the module docstring for the rule).

    Parameters
    ----------
    tokens, positions, offsets, slot_mapping, sampled : torch.Tensor
        [B] int64, contiguous: the step's input token, its position, the index of the token the
        step draws (the sampler's Philox offset), the K/V slot (output), the previous step's draw.
    seq_lens, advance : torch.Tensor
        [B] int32, contiguous: K/V length after this step's token (0: a padding row), whether the
        row continues the previous step (set to 1 for every live row on return).
    block_tables : torch.Tensor
        [B, max_blocks] int32, unit column stride.
    block_size : int

    Never syncs with the host, so it can be captured in a CUDA graph.

    Examples
    --------
    >>> t = torch.tensor([7], device="cuda"); pos = torch.tensor([4], device="cuda")
    >>> lens = torch.tensor([5], dtype=torch.int32, device="cuda"); off = torch.zeros_like(pos)
    >>> slot = torch.empty_like(pos); adv = torch.zeros_like(lens)
    >>> tables = torch.tensor([[3, 9]], dtype=torch.int32, device="cuda")
    >>> decode_inputs_(t, pos, lens, off, slot, adv, torch.tensor([11], device="cuda"), tables, 4)
    >>> slot.item()  # position 4 lives in block 9, row 0
    36
    """
    _check(tokens, positions, seq_lens, offsets, slot_mapping, advance, sampled, block_tables, block_size)
    check_triton_device("decode_inputs_", tokens.device)
    B = tokens.shape[0]
    if B == 0:
        return
    block = max(16, triton.next_power_of_2(B))
    _decode_inputs_kernel[(1,)](tokens, positions, seq_lens, offsets, slot_mapping, advance, sampled,
                                block_tables, block_tables.stride(0), B, block_tables.shape[1], block_size,
                                BLOCK=block, num_warps=4 if block <= 256 else 8)


def decode_inputs_ref_(tokens: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                       offsets: torch.Tensor, slot_mapping: torch.Tensor, advance: torch.Tensor,
                       sampled: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """Eager reference of `decode_inputs_` (same signature, in place)."""
    _check(tokens, positions, seq_lens, offsets, slot_mapping, advance, sampled, block_tables, block_size)
    live = seq_lens > 0
    step = live & (advance != 0)
    tokens.copy_(torch.where(step, sampled.clamp_min(0), tokens))
    positions.add_(step.long())
    seq_lens.add_(step.int())
    offsets.add_(step.long())
    col = torch.div(positions, block_size, rounding_mode="floor")
    in_table = live & (col < block_tables.shape[1])
    block = block_tables.long().gather(1, torch.where(in_table, col, 0)[:, None]).squeeze(1)
    ok = in_table & (block != 0)
    slot_mapping.copy_(torch.where(ok, block * block_size + positions % block_size, -1))
    advance.copy_(live.int())

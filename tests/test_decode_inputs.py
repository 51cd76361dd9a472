"""The decode-step input op (gptfast/ops/decode_inputs.py): kernel (interpreter) and reference
against a plain-Python statement of the rule, on random rows: live and padding rows, rows that
advance and rows the host filled, flagged draws (-1), block boundaries with and without a block."""

from __future__ import annotations

import pytest
import torch

from gptfast.ops import decode_inputs as di

IMPLS = [di.decode_inputs_, di.decode_inputs_ref_]


def _expected(t, pos, lens, off, adv, sampled, tables, bs):
    out = []
    for r in range(len(t)):
        live = lens[r] > 0
        tok, p, n, o = t[r], pos[r], lens[r], off[r]
        if live and adv[r]:
            tok, p, n, o = max(sampled[r], 0), p + 1, n + 1, o + 1
        col = p // bs
        block = tables[r][col] if live and col < len(tables[r]) else 0
        slot = block * bs + p % bs if block else -1
        out.append((tok, p, n, o, slot, int(live)))
    return out


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("B, bs", [(1, 4), (7, 4), (37, 16), (3, 1)])
def test_decode_inputs_rule(impl, B, bs):
    g = torch.Generator().manual_seed(B * 100 + bs)
    max_blocks = 5
    pos = torch.randint(0, max_blocks * bs + 2, (B,), generator=g)  # some past the table
    lens = (pos + 1).int()
    lens[torch.rand(B, generator=g) < 0.3] = 0  # padding rows
    tokens = torch.randint(0, 1000, (B,), generator=g)
    offsets = torch.randint(0, 50, (B,), generator=g)
    advance = (torch.rand(B, generator=g) < 0.6).int()
    sampled = torch.randint(-1, 1000, (B,), generator=g)
    tables = torch.randint(1, 99, (B, max_blocks), generator=g, dtype=torch.int32)
    tables[torch.rand(B, max_blocks, generator=g) < 0.25] = 0  # no block reserved there
    if B > 1:  # a row that crosses into a block the host named, and one into a block it did not
        pos[0], lens[0], advance[0], tables[0, 1] = bs - 1, bs, 1, 42
        pos[1], lens[1], advance[1], tables[1, 1] = bs - 1, bs, 1, 0
    want = _expected(tokens.tolist(), pos.tolist(), lens.tolist(), offsets.tolist(), advance.tolist(),
                     sampled.tolist(), tables.tolist(), bs)
    slot = torch.full((B,), -7, dtype=torch.int64)  # poisoned: every row must be written
    impl(tokens, pos, lens, offsets, slot, advance, sampled, tables, bs)
    got = list(zip(tokens.tolist(), pos.tolist(), lens.tolist(), offsets.tolist(), slot.tolist(),
                   advance.tolist()))
    assert got == want
    if B > 1:
        assert slot[0].item() == 42 * bs and slot[1].item() == -1


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_decode_inputs_bad_inputs_raise(impl):
    z = lambda dt=torch.int64: torch.zeros(2, dtype=dt)  # noqa: E731
    tables = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens must be a contiguous"):
        impl(z(), z(), z(), z(), z(), z(torch.int32), z(), tables, 4)
    with pytest.raises(ValueError, match="block_tables must be an int32"):
        impl(z(), z(), z(torch.int32), z(), z(), z(torch.int32), z(), tables.long(), 4)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        impl(z(), z(), z(torch.int32), z(), z(), z(torch.int32), z(), tables, 0)

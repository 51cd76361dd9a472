"""`layernorm_head_argmax(..., out=(tokens, status))`: the decode graphs' greedy head writes the
runner's static outputs (the next step in flight reads its input tokens from them)."""

from __future__ import annotations

import pytest
import torch

from gptfast.ops import head_argmax


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_greedy_head_writes_the_given_outputs(impl):
    fn = head_argmax.layernorm_head_argmax if impl == "triton" else head_argmax.layernorm_head_argmax_ref
    gen = torch.Generator().manual_seed(5)
    R, C, V = 3, 40, 301
    x = torch.randn(R, C, generator=gen)
    lnw, lnb = 1 + 0.1 * torch.randn(C, generator=gen), 0.1 * torch.randn(C, generator=gen)
    w = 0.2 * torch.randn(V, C, generator=gen)
    want = head_argmax.layernorm_head_argmax_ref(x, lnw, lnb, 1e-5, w)
    # views of one static buffer, poisoned: every row must be written
    tokens, status = torch.full((R + 2,), -5, dtype=torch.int64), torch.full((R + 2,), 9, dtype=torch.int32)
    got = fn(x, lnw, lnb, 1e-5, w, out=(tokens[:R], status[:R]))
    assert got[0].data_ptr() == tokens.data_ptr() and got[1].data_ptr() == status.data_ptr()
    assert tokens[:R].tolist() == want[0].tolist() and status[:R].tolist() == want[1].tolist() == [0] * R
    assert tokens[R:].tolist() == [-5, -5] and status[R:].tolist() == [9, 9]  # nothing past R
    bad = [((tokens[:R].int(), status[:R]), "int64"), ((tokens[:R], status[:R].long()), "int32"),
           ((tokens[:R + 1], status[:R]), r"\(3,\)"), ((tokens[::2][:R], status[:R]), "contiguous")]
    for out, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(x, lnw, lnb, 1e-5, w, out=out)

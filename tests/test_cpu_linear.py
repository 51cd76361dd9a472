"""The CPU decode linear on panel-packed int8 weights (gptfast/ops/cpu_linear.py, csrc/cpu_linear.cpp).

Every instruction set this CPU runs is compared with the eager reference at awkward sizes (N not a
multiple of the 32-column panel, K odd, rows past one 8-row tile), and the properties the runtime
leans on are pinned: a row's result does not depend on the rows beside it or on the thread split,
strided inputs and outputs are honoured, and bad arguments are refused before the kernel reads a
pointer.
"""

from __future__ import annotations

import pytest
import torch

from gptfast import _cpu, quant
from gptfast.ops import cpu_linear as cl

ISAS = cl.supported_isas()


def _int8_weight(N, K, gen):
    """(q [N, K] int8, scale [N] fp32) of a random weight, as the model quantises it."""
    return quant.quantize_int8(torch.randn(N, K, generator=gen))


def test_the_extension_is_built_and_names_its_instruction_sets():
    assert cl.AVAILABLE
    assert ISAS[0] == "portable" and set(ISAS) <= {"portable", "avx2", "avx512"}
    assert _cpu.best_isa() == ISAS[-1]
    assert _cpu.PANEL == cl.PANEL


def test_pack_and_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(45, 7, generator=gen) * 50).to(torch.int8)
    panels = cl.pack_panels(w)
    assert panels.shape == (2, 7, 32) and panels.dtype == torch.int8
    assert torch.equal(cl.unpack_panels(panels, 45), w)
    assert torch.equal(panels[0, :, 3], w[3]) and torch.equal(panels[1, :, 12], w[44])
    assert not panels[1, :, 13:].any(), "the columns past the last row are zero"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 19])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(isa, M, bias):
    gen = torch.Generator().manual_seed(M)
    N, K = 77, 45
    w, scale = _int8_weight(N, K, gen)
    b = torch.randn(N, generator=gen) if bias else None
    x = torch.randn(M, K, generator=gen)
    panels = cl.pack_panels(w)
    got = cl.cpu_linear(x, panels, N, scale, b, isa=isa)
    exact = x.double() @ (w.double() * scale.double()[:, None]).T
    if b is not None:
        exact += b.double()
    assert got.shape == (M, N) and got.dtype == torch.float32
    # fp32 sums of K products: at most K roundings of the running sum of |x_k w_k|
    mag = x.double().abs() @ (w.double().abs() * scale.double()[:, None]).T
    bound = K * 2.0**-24 * mag + 2.0**-22 * exact.abs() + 1e-30
    worst = float(((got.double() - exact).abs() / bound).max())
    assert worst <= 1, f"{isa}: error {worst:.2f}x the fp32 summation bound"
    ref = cl.cpu_linear_ref(x, panels, N, scale, b)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_a_row_is_the_same_alone_as_in_any_batch(isa):
    """Bitwise: each output is one fp32 sum over k in order, whatever the rows beside it (so a
    sequence's int8 logits do not depend on its batch)."""
    gen = torch.Generator().manual_seed(1)
    w, scale = _int8_weight(100, 64, gen)
    panels = cl.pack_panels(w)
    x = torch.randn(13, 64, generator=gen)
    batch = cl.cpu_linear(x, panels, 100, scale, isa=isa)
    for m in (0, 7, 8, 12):
        alone = cl.cpu_linear(x[m:m + 1], panels, 100, scale, isa=isa)
        assert torch.equal(alone[0], batch[m]), f"row {m} differs in a batch of 13"


@pytest.mark.skipif(not _cpu.openmp(), reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", ISAS)
def test_the_thread_split_does_not_change_the_result(isa):
    gen = torch.Generator().manual_seed(2)
    w, scale = _int8_weight(300, 32, gen)
    panels = cl.pack_panels(w)
    x = torch.randn(3, 32, generator=gen)
    outs = []
    for threads in (1, 2, 3):
        y = torch.empty(3, 300)
        _cpu.linear_int8(x.data_ptr(), 32, panels.data_ptr(), scale.data_ptr(), 0, y.data_ptr(), 300,
                         3, 300, 32, threads, cl.ISAS.index(isa))
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_strided_rows_in_and_out():
    gen = torch.Generator().manual_seed(3)
    w, scale = _int8_weight(40, 16, gen)
    panels = cl.pack_panels(w)
    wide = torch.randn(4, 48, generator=gen)
    x = wide[:, 16:32]  # rows 48 apart
    out_wide = torch.full((4, 64), 7.0)
    out = out_wide[:, 8:48]
    got = cl.cpu_linear(x, panels, 40, scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, cl.cpu_linear_ref(x.contiguous(), panels, 40, scale), atol=1e-5, rtol=1e-5)
    assert bool((out_wide[:, :8] == 7).all() & (out_wide[:, 48:] == 7).all()), "wrote outside `out`"


def test_empty_batch():
    w, scale = _int8_weight(40, 16, torch.Generator().manual_seed(4))
    assert cl.cpu_linear(torch.empty(0, 16), cl.pack_panels(w), 40, scale).shape == (0, 40)


def test_bad_arguments_are_refused():
    gen = torch.Generator().manual_seed(5)
    w, scale = _int8_weight(40, 16, gen)
    panels = cl.pack_panels(w)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="x must be fp32"):
        cl.cpu_linear(x.double(), panels, 40, scale)
    with pytest.raises(ValueError, match=r"x must be fp32 \[M, 16\]"):
        cl.cpu_linear(torch.randn(2, 15), panels, 40, scale)
    with pytest.raises(ValueError, match="rows apart"):
        cl.cpu_linear(torch.randn(1, 16).expand(2, 16), panels, 40, scale)
    with pytest.raises(ValueError, match="n = 70 does not match 2 panels"):
        cl.cpu_linear(x, panels, 70, scale)
    with pytest.raises(ValueError, match="int8 panels need their fp32 scales"):
        cl.cpu_linear(x, panels, 40, None)
    with pytest.raises(ValueError, match="panels must be contiguous int8"):
        cl.cpu_linear(x, panels.float(), 40, scale)
    with pytest.raises(ValueError, match=r"scale must be contiguous fp32 \[40\]"):
        cl.cpu_linear(x, panels, 40, scale[:39])
    with pytest.raises(ValueError, match=r"bias must be contiguous fp32 \[40\]"):
        cl.cpu_linear(x, panels, 40, scale, torch.zeros(40, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"out must be fp32 \[2, 40\]"):
        cl.cpu_linear(x, panels, 40, scale, out=torch.empty(2, 41))
    with pytest.raises(ValueError, match="panels must be"):
        cl.cpu_linear(x, w, 40, scale)
    square, square_scale = _int8_weight(40, 40, gen)
    xs = torch.randn(2, 40)
    with pytest.raises(ValueError, match="out overlaps x"):
        cl.cpu_linear(xs, cl.pack_panels(square), 40, square_scale, out=xs)
    with pytest.raises(ValueError, match="out overlaps bias"):
        both = torch.zeros(2, 40)
        cl.cpu_linear(x, panels, 40, scale, both[1], out=both)
    with pytest.raises(ValueError, match="isa must be one of"):
        cl.cpu_linear(x, panels, 40, scale, isa="sse")
    with pytest.raises(ValueError, match="pack_panels takes a 2-D int8 CPU weight"):
        cl.pack_panels(w.float())
    with pytest.raises(ValueError, match="empty"):
        cl.pack_panels(torch.empty(0, 4, dtype=torch.int8))
    unsupported = [name for name in ("avx2", "avx512") if name not in ISAS]
    for name in unsupported:
        with pytest.raises(ValueError, match="this CPU does not support"):
            cl.cpu_linear(x, panels, 40, scale, isa=name)

"""int8 weight quantisation (gptfast.quant, ops/quant_linear.py) and the CPU decode fast path.

The accuracy policy is measured on a tiny GPT-2 trained here for a few seconds on a synthetic
corpus (random weights make perplexity meaningless): int8 perplexity on held-out text within 1% of
fp32, logits close by relative error, greedy tokens agreeing over a short horizon.
"""

from __future__ import annotations

import math

import pytest
import torch

import gptfast
import gptfast.model as gmodel
from gptfast import GPT2, quant
from gptfast.config import GPT2Config
from gptfast.ops.common import assert_close
from gptfast.ops.quant_linear import int8_linear, int8_linear_ref

from checkpoints import hf_config

# fp32: the kernel and the reference sum K products in different orders
_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=5e-2)}


def _weights(N, K, gen):
    w = torch.randn(N, K, generator=gen) * 0.02
    w[0] *= 50  # one row far larger than the rest: per-channel scales keep the others exact
    return w


# ---------------------------------------------------------------- quantize_int8
def test_quantize_int8_error_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = _weights(37, 53, gen)
    w[5] = 0.0  # an all-zero row
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (37,)
    assert int(q.abs().max()) == 127
    err = (quant.dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-9).all()), f"max error / scale {float((err / s[:, None]).max())}"
    assert bool((q[5] == 0).all())
    assert bool((s[5] == 1) & (s[6] == w[6].abs().max() / 127)), "an all-zero row gets 1, others max|w| / 127"


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 3, dtype=torch.int32)], ids=["1d", "int"])
def test_quantize_int8_rejects(bad):
    with pytest.raises(ValueError, match="quantize_int8"):
        quant.quantize_int8(bad)


def test_quantize_mode_rejected():
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        GPT2.from_config("tiny", seed=0, quantize="int4")


# ---------------------------------------------------------------- the Triton GEMV (interpreter)
@pytest.mark.parametrize("M,N,K,bias", [(1, 97, 63, True), (3, 130, 200, False), (8, 64, 64, True),
                                         (11, 33, 300, True)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_linear_kernel(M, N, K, bias, dtype):
    gen = torch.Generator().manual_seed(M * 1000 + N)
    q, s = quant.quantize_int8(_weights(N, K, gen))
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    assert_close(int8_linear(x, q, s, b), int8_linear_ref(x, q, s, b), name="int8_linear", **_TOL[dtype])


def test_int8_linear_reference_is_the_dequantised_matmul():
    gen = torch.Generator().manual_seed(1)
    q, s = quant.quantize_int8(_weights(40, 24, gen))
    x, b = torch.randn(2, 5, 24, generator=gen), torch.randn(40, generator=gen)
    expected = torch.nn.functional.linear(x, quant.dequantize_int8(q, s), b)
    assert_close(int8_linear_ref(x, q, s, b), expected, atol=1e-5, rtol=1e-5)


def test_int8_linear_checks():
    q, s = quant.quantize_int8(torch.randn(8, 16))
    with pytest.raises(ValueError, match="x has 15 features but q has K = 16"):
        int8_linear_ref(torch.randn(2, 15), q, s)
    with pytest.raises(ValueError, match="scale must be fp32 of shape"):
        int8_linear_ref(torch.randn(2, 16), q, s.double())


# ---------------------------------------------------------------- the CPU int8 matmul
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_linear_cpu_is_weight_only(monkeypatch, dtype):
    """The CPU matmul runs `ops.cpu_linear` on the int8 panels with the activations in fp32: every
    output, in a row of tiny values beside large ones too, is the dequantised fp32 matmul's up to
    fp32 summation order (int8 or bf16 activations would cost the small row its precision)."""
    from gptfast.ops import cpu_linear

    gen = torch.Generator().manual_seed(2)
    w, b = _weights(96, 64, gen), torch.randn(96, generator=gen).to(dtype)
    holder = gmodel._PackedHolder()
    packed = quant.int8_weight(holder, w.to(dtype))
    assert packed.q is None and packed.panels.dtype == torch.int8, "the CPU keeps only the panel layout"
    x = torch.randn(4, 64, generator=gen)
    x[1] *= 1e-3  # a row of small values beside rows of large ones
    x = x.to(dtype)
    calls = []
    real = cpu_linear.cpu_linear
    monkeypatch.setattr(cpu_linear, "cpu_linear", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    y = quant.int8_linear_cpu(x.view(2, 2, 64), packed, b)
    assert calls == [torch.float32], "the CPU path must run ops.cpu_linear on fp32 activations"
    assert y.dtype == dtype and y.shape == (2, 2, 96)
    wq = packed.dequantize().double()
    exact = x.double() @ wq.T
    # fp32 sums of 64 products (at most 64 roundings of the running sum of |x_k w_k|), then the
    # scale and the bias (one rounding each of the result)
    bound = 64 * 2.0**-24 * (x.double().abs() @ wq.abs().T) + 2.0**-22 * (exact.abs() + b.double().abs())
    err = (y.view(4, 96).double() - b.double() - exact).abs()
    if dtype is torch.bfloat16:  # the result is rounded to bf16 (and the bias added in it)
        bound += 2.0**-8 * (exact.abs() + b.double().abs())
    worst = float((err / bound).max())
    assert worst <= 1, f"error {worst:.2f}x the fp32 summation bound"


# ---------------------------------------------------------------- int8 copies follow the weights
def test_int8_copies_follow_in_place_changes_replacements_and_casts():
    model = GPT2.from_config("tiny", seed=0, quantize="int8")
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(ids)
    fc = model.h[0].mlp.c_fc
    original = fc.weight.detach().clone()
    with torch.no_grad():
        fc.weight.mul_(3.0)
    after = model(ids)
    fresh = GPT2.from_config("tiny", seed=0, quantize="int8")
    with torch.no_grad():
        fresh.h[0].mlp.c_fc.weight.mul_(3.0)
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh(ids)), "the int8 copy did not follow an in-place change"
    # a replacement through .data (no hook sees it): the copy is keyed by the tensor
    with torch.no_grad():
        fc.weight.data = original.clone()
    assert torch.equal(model(ids), before)
    # a cast: the copies are made again from the bf16 weights
    model.to(torch.bfloat16)
    assert model(ids).dtype == torch.bfloat16
    assert_close(model(ids).float(), before, atol=0.1, rtol=0.1)


def test_refresh_weight_copies_in_place():
    model = GPT2.from_config("tiny", seed=0, quantize="int8")
    model(torch.tensor([[1, 2, 3]]))
    fc = model.h[1].mlp.c_proj
    q_before, ptr, scale_ptr = fc._int8.int8().clone(), fc._int8.panels.data_ptr(), fc._int8.scale.data_ptr()
    with torch.no_grad():
        fc.weight.neg_()
    model.refresh_weight_copies()
    assert fc._int8.panels.data_ptr() == ptr, "a refresh must keep the addresses a CUDA graph holds"
    assert fc._int8.scale.data_ptr() == scale_ptr
    assert torch.equal(fc._int8.int8(), -q_before)


def test_a_replacement_with_other_rows_in_the_same_panels_is_a_fresh_copy():
    """40 and 45 rows fill the same two 32-column panels: the copy is made anew, not refreshed in
    place (its scales and row count differ)."""
    holder = gmodel._PackedHolder()
    gen = torch.Generator().manual_seed(4)
    w40, w45 = torch.randn(40, 16, generator=gen), torch.randn(45, 16, generator=gen)
    quant.int8_weight(holder, w40)
    fresh = quant.int8_weight(holder, w45)
    assert fresh.n == 45 and fresh.scale.shape == (45,)
    x = torch.randn(2, 16, generator=gen)
    torch.testing.assert_close(quant.int8_linear_cpu(x, fresh, None), x @ fresh.dequantize().T, atol=1e-5, rtol=1e-5)


def test_a_copy_made_for_cuda_is_remade_for_the_cpu():
    """A copy made while CPU tensors stand in for CUDA (`ops.as_cuda`, the kernels tool) keeps the
    Triton op's layout; used on the CPU afterwards it is made again in the CPU kernel's."""
    holder = gmodel._PackedHolder()
    w = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    with gptfast.ops.as_cuda(4):
        assert quant.int8_weight(holder, w).panels is None
    cpu = quant.int8_weight(holder, w)
    assert cpu.q is None and cpu.panels is not None


def test_int8_linear_cpu_refuses_a_mismatched_input():
    """The CPU path skips the kernel's per-call checks, so it checks what it is handed itself: an
    input whose features do not match must not be reshaped into the weight's K."""
    packed = quant.int8_weight(gmodel._PackedHolder(), torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"x \[\.\.\., 16\] and bias \[8\]"):
        quant.int8_linear_cpu(torch.randn(4, 8), packed, None)  # 32 values: reshapes to (2, 16)
    with pytest.raises(ValueError, match="bias"):
        quant.int8_linear_cpu(torch.randn(2, 16), packed, torch.zeros(9))


def test_quantize_weights_off_again_is_the_float_model():
    ids = torch.tensor([[5, 6, 7, 8]])
    model = GPT2.from_config("tiny", seed=0)
    expected = model(ids)
    model.quantize_weights("int8")
    assert not torch.equal(model(ids), expected)
    model.quantize_weights(None)
    assert torch.equal(model(ids), expected)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_fp32_cpu_linear_follows_weight_changes(rows):
    """fp32 matmuls of 3+ rows run on a prepacked copy of the weight: it follows in-place
    changes, replacements and casts, and gives F.linear's result."""
    from gptfast.model import Linear

    gen = torch.Generator().manual_seed(rows)
    lin = Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=gen))
    x = torch.randn(rows, 64, generator=gen)

    def check():
        assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)

    check()
    assert (lin._packed is not None) == (rows >= gptfast.ops.packed_linear.PACKED_FP32_ROWS)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place
    check()
    with torch.no_grad():
        lin.weight.data = lin.weight.data * 0.5  # a replacement no hook sees
    check()
    lin.to(torch.bfloat16)
    got = lin(x.bfloat16()).float()
    assert_close(got, torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float()), atol=0.1, rtol=0.05)


def test_int8_generate_through_triton_kernels(monkeypatch):
    """A whole greedy generate() with every op, the int8 GEMV included, through the Triton
    interpreter gives the reference path's tokens (the path a CUDA model takes)."""
    model = GPT2.from_config("tiny", seed=0, quantize="int8")
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    monkeypatch.setenv("GPTFAST_KERNELS", "reference")
    ref = model.generate(ids, **kw)
    logits_ref = model(ids)
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    model.kv_cache.reset_prefix_cache()
    calls = []
    real = gptfast.ops.int8_linear
    monkeypatch.setattr(gptfast.ops, "int8_linear",
                        lambda *a: calls.append(gptfast.ops.use_triton(*a[:1])) or real(*a))
    got = model.generate(ids, **kw)
    assert calls and all(calls), "the Triton int8 GEMV was not used"
    # both paths are weight-only int8 with fp32 activations and sums: the same logits up to
    # summation order, and the same greedy tokens
    with gptfast.ops.backend("triton"):
        logits = model(ids)
    rel = float((logits - logits_ref).norm() / logits_ref.norm())
    assert rel < 1e-5, f"Triton vs CPU int8 logits: relative error {rel:.3e}"
    assert torch.equal(got, ref)


# ---------------------------------------------------------------- accuracy policy (trained tiny GPT-2)
_TINY = GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=2, n_head=4, eos_token_id=None,
                   bos_token_id=None, pad_token_id=None)


def _corpus(n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed sparse Markov chain over 64 tokens (each token has 3 likely
    successors): learnable in seconds, with a perplexity far below the vocabulary size."""
    table_gen = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, 64, (64, 3), generator=table_gen)
    probs = torch.tensor([0.6, 0.3, 0.1])
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.empty(n_seqs, seq_len, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, 64, (n_seqs,), generator=gen)
    for t in range(1, seq_len):
        pick = torch.multinomial(probs.expand(n_seqs, 3), 1, generator=gen).squeeze(1)
        seqs[:, t] = succ[seqs[:, t - 1], pick]
    return seqs


@pytest.fixture(scope="module")
def trained():
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(hf_config(_TINY))
        data = _corpus(512, 48, seed=1)
        opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
        hf.train()
        for step in range(120):
            batch = data[(step * 32) % 512:][:32]
            loss = hf(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    hf.eval()
    return hf, _corpus(64, 48, seed=2)


def _perplexity(model: GPT2, held_out: torch.Tensor) -> float:
    logits = model(held_out).float()  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            held_out[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_int8_accuracy_policy(trained):
    hf, held_out = trained
    fp32 = GPT2.from_pretrained(hf)
    int8 = GPT2.from_pretrained(hf, quantize="int8")
    ppl32, ppl8 = _perplexity(fp32, held_out), _perplexity(int8, held_out)
    assert ppl32 < 8, f"the tiny model did not learn the corpus (perplexity {ppl32:.2f} of 64 tokens)"
    assert ppl8 <= ppl32 * 1.01, f"int8 perplexity {ppl8:.4f} is more than 1% above fp32's {ppl32:.4f}"
    a, b = fp32(held_out[:8]), int8(held_out[:8])
    rel = float((b - a).norm() / a.norm())
    assert rel < 3e-2, f"int8 logits vs fp32: relative error {rel:.3e}"
    prompts = held_out[:8, :8]
    kw = dict(max_new_tokens=8, do_sample=False)
    same = (fp32.generate(prompts, **kw) == int8.generate(prompts, **kw)).all(1)
    assert int(same.sum()) >= 6, f"greedy tokens agree on {int(same.sum())}/8 prompts over 8 tokens"


# ---------------------------------------------------------------- the CPU decode fast path
@pytest.mark.parametrize("dtype,quantize,gather", [
    (torch.float32, None, "step"), (torch.float32, None, "layer"), (torch.bfloat16, None, "step"),
    (torch.float32, "int8", "step"), (torch.bfloat16, "int8", "layer")], ids=str)
def test_cpu_decode_fast_path_matches_general_path(monkeypatch, dtype, quantize, gather):
    """The lean CPU decode step gives the general paged path's tokens on a ragged batch (and is
    the path taken), with the K/V gathered once per step or layer by layer."""
    if gather == "layer":
        monkeypatch.setattr(gmodel, "_STEP_GATHER_BYTES", 0)
    model = GPT2.from_config("tiny", seed=0, dtype=dtype, quantize=quantize)
    ids = torch.randint(1, 1000, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    calls = []
    real = GPT2._decode_cpu
    monkeypatch.setattr(GPT2, "_decode_cpu", lambda self, *a: calls.append(1) or real(self, *a))
    fast = model.generate(ids, **kw)
    assert calls, "the CPU decode fast path was not taken"
    monkeypatch.setattr(gmodel, "_plain_decode", lambda meta: False)
    model.kv_cache.reset_prefix_cache()
    assert torch.equal(fast, model.generate(ids, **kw))


def test_cpu_decode_padding_rows_take_the_general_path(monkeypatch):
    """The static runner's padding rows (slot -1, no keys) are not the fast path's: the step
    with padding rows still gives each row its own tokens."""
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    model = GPT2.from_config("tiny", seed=0)
    ids = torch.randint(1, 1000, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    together = model.generate(ids, **kw)  # bucket 3: no padding rows
    alone = [model.generate(ids[i:i + 1], **kw) for i in range(3)]
    two = model.generate(ids[:2], **kw)  # bucket 2
    assert torch.equal(together, torch.cat(alone))
    assert torch.equal(two, together[:2])


def test_switching_quantisation_drops_the_prefix_cache_and_the_decode_graphs(monkeypatch):
    """Prompt K/V cached under float weights is not reused once the model runs int8 (and back),
    and the decode runner is rebuilt for the other path (GPTFAST_CUDA_GRAPHS=1 on the CPU runs
    the same static-buffer step)."""
    from gptfast import graphs

    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_logits=True, return_dict_in_generate=True)
    fresh = GPT2.from_config("tiny", seed=0, quantize="int8").generate(ids, **kw)
    model = GPT2.from_config("tiny", seed=0)
    model.generate(ids, **kw)  # float: the prompt's blocks are cached
    runner = graphs.graph_runner(model)
    model.quantize_weights("int8")
    assert graphs.graph_runner(model) is not runner
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, fresh.sequences)
    assert torch.equal(got.logits[0], fresh.logits[0])
    model.quantize_weights(None)
    back = model.generate(ids, **kw)
    assert torch.equal(back.logits[0], GPT2.from_config("tiny", seed=0).generate(ids, **kw).logits[0])

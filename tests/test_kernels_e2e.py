"""A whole generate() through the Triton kernels (GPTFAST_KERNELS=triton): on the CPU they run in
Triton's interpreter (tests/conftest.py), on a GPU natively. Greedy tokens must equal HF's."""

from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast import GPT2, GPT2Config

from checkpoints import make_hf_model

# Small enough for the interpreter: 2 layers, 4 heads of 16, block size 4 so every sequence
# spans several blocks.
CONFIG = GPT2Config(vocab_size=211, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                    bos_token_id=210, eos_token_id=210)


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(CONFIG, seed=4)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["0", "1"], ids=["eager-decode", "graph-runner"])
def graphs(request, monkeypatch):
    """Decode steps eager, or through the graph runner (captured on a GPU, its static-buffer
    step run eagerly on the CPU)."""
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", request.param)
    return request.param == "1"


_FUSED_OPS = ("embed_layernorm", "add_layernorm", "linear_gelu", "decode_attention",
              "embed_layernorm_linear", "layernorm_linear", "decode_attention_partials",
              "attn_merge_linear_residual", "linear_residual", "layernorm_head_argmax")


def _count_fused_calls(monkeypatch) -> dict:
    """Count calls of the fused ops the model's kernel path uses."""
    from gptfast import ops

    calls = dict.fromkeys(_FUSED_OPS, 0)
    for name in _FUSED_OPS:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            if _name.startswith("decode_attention"):
                calls[_name + "_append"] = calls.get(_name + "_append", 0) + ("k_new" in kwargs)
                calls[_name + "_bias"] = calls.get(_name + "_bias", 0) + (kwargs.get("qkv_bias") is not None)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


def _batch(rows: int = 3):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (rows, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_greedy_through_kernels_matches_hf(hf, monkeypatch, graphs):
    """3 rows: decode steps take the small-batch GEMV kernels (`gptfast.model._GemvStages`)."""
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    calls = _count_fused_calls(monkeypatch)
    model = GPT2.from_pretrained(hf, device=_device(), block_size=4)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(ids, do_sample=False, **kw)
    got = gptfast.generate(model, ids.to(model.device), **kw).cpu()
    assert torch.equal(got, ref), f"kernels: {got.tolist()}\nHF: {ref.tolist()}"
    stats = model.kv_cache.stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    layers = CONFIG.n_layer
    # the prefill step: embed+LN, two add+LN per layer, c_fc + GELU
    prefills = calls["embed_layernorm"]
    assert prefills >= 1 and calls["add_layernorm"] == 2 * layers * prefills
    assert calls["linear_gelu"] == layers * prefills
    # 5 decode steps, each 5 GEMV-path launches per layer: block 0's c_attn with the embedding,
    # the other c_attn, every c_fc and the head through layernorm_linear, the attention partials
    # with the K/V append (c_attn's bias already added), the merge in c_proj, the MLP's c_proj;
    # the graph runner's greedy graph ends in the fused greedy head instead of the logits head
    steps = calls["embed_layernorm_linear"]
    assert steps == 5 and calls["decode_attention"] == 0
    heads = steps if graphs else 0
    assert calls["layernorm_head_argmax"] == heads
    assert calls["layernorm_linear"] == 2 * layers * steps - heads
    assert calls["decode_attention_partials"] == calls["decode_attention_partials_append"] == layers * steps
    assert calls["decode_attention_partials_bias"] == 0
    assert calls["attn_merge_linear_residual"] == calls["linear_residual"] == layers * steps
    if graphs:
        from gptfast.graphs import graph_runner

        assert graph_runner(model).num_replays == 5


def test_greedy_through_kernels_above_8_rows_keeps_the_cublas_path(hf, monkeypatch):
    """9 rows: decode steps keep `_FusedStages` (cuBLAS GEMMs with fused epilogues, the K/V
    append and c_attn's bias inside the attention kernel); still HF's tokens."""
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    calls = _count_fused_calls(monkeypatch)
    model = GPT2.from_pretrained(hf, device=_device(), block_size=4)
    ids, mask = _batch(rows=9)
    kw = dict(attention_mask=mask, max_new_tokens=2, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(ids, do_sample=False, **kw)
    got = gptfast.generate(model, ids.to(model.device), **kw).cpu()
    assert torch.equal(got, ref), f"kernels: {got.tolist()}\nHF: {ref.tolist()}"
    layers = CONFIG.n_layer
    steps = calls["embed_layernorm"] - 1  # one prefill step for the 9 prompts
    assert steps == 1 and calls["embed_layernorm_linear"] == calls["decode_attention_partials"] == 0
    assert calls["decode_attention_append"] == calls["decode_attention_bias"] == layers * steps


def test_gemv_decode_off_takes_the_unfused_kernels_with_the_same_tokens(hf, monkeypatch, graphs):
    """`gemv_decode=False` (the benchmarks' baseline for the GEMV step): 3 rows decode through
    `_FusedStages` (cuBLAS GEMMs, the attention kernel with the K/V append) and give the tokens
    of the default GEMV step; an engine with it gets a graph runner of its own op set."""
    calls = _count_fused_calls(monkeypatch)
    model = GPT2.from_pretrained(hf, device=_device(), block_size=4)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=None, kernels="triton")
    fused = gptfast.generate(model, ids.to(model.device), **kw).cpu()
    assert calls["embed_layernorm_linear"] == 3 and calls.get("decode_attention_append", 0) == 0
    before = dict(calls)
    unfused = gptfast.generate(model, ids.to(model.device), gemv_decode=False, **kw).cpu()
    assert torch.equal(unfused, fused), f"unfused: {unfused.tolist()}\nGEMV: {fused.tolist()}"
    layers = CONFIG.n_layer
    assert calls["embed_layernorm_linear"] == before["embed_layernorm_linear"]  # no GEMV step ran
    assert calls["decode_attention_append"] - before.get("decode_attention_append", 0) == 3 * layers
    if graphs:
        from gptfast.graphs import graph_runner

        with gptfast.ops.backend("triton", gemv_decode=False):
            unfused_runner = graph_runner(model)  # the runner the unfused generate ran on
        # no fused greedy head without the GEMV ops: the greedy rows take the sampler
        assert unfused_runner.steps_by_variant == {"sample": 3}
        # the runner keeps its op set outside the context it was built in
        assert not unfused_runner.gemv_decode and not unfused_runner.has_greedy_head(1)
        assert graph_runner(model) is not unfused_runner  # the other op set: another runner
    with pytest.raises(ValueError, match="gemv_decode must be True or False"):
        gptfast.Engine(model, gemv_decode="no")


def test_sampling_through_kernels_is_seeded_and_top_k_1_is_greedy(hf, monkeypatch, graphs):
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    model = GPT2.from_pretrained(hf, device=_device(), block_size=4)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    a = gptfast.generate(model, ids, do_sample=True, top_p=0.9, seed=3, **kw)
    b = gptfast.generate(model, ids, do_sample=True, top_p=0.9, seed=3, **kw)
    assert torch.equal(a, b)
    greedy = gptfast.generate(model, ids, **kw)
    top1 = gptfast.generate(model, ids, do_sample=True, top_k=1, seed=9, **kw)
    assert torch.equal(greedy, top1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_generate_on_gpu_within_policy(hf, dtype):
    model32 = GPT2.from_pretrained(hf, device="cuda")
    model = GPT2.from_pretrained(hf, device="cuda", dtype=dtype)
    ids, mask = _batch()
    ids, mask = ids.cuda(), mask.cuda()
    ref = model32(ids, attention_mask=mask)
    got = model(ids, attention_mask=mask).float()
    real = mask.bool()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1))[real].max().item()
    assert rel < (1e-2 if dtype == torch.float16 else 5e-2)
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    out = gptfast.generate(model, ids, **kw)
    ref_out = gptfast.generate(model32, ids, **kw)
    agree = (out[:, ids.shape[1]] == ref_out[:, ids.shape[1]]).float().mean().item()
    assert agree >= 0.5


def test_compare_reports_infinities_and_nans(monkeypatch):
    from gptfast.ops.common import compare, use_triton

    inf = float("inf")
    for got, want in ((0.0, -inf), (1.0, inf), (-inf, inf), (float("nan"), 1.0), (1.0, float("nan"))):
        assert compare(torch.tensor([got]), torch.tensor([want]), 1e-5, 1e-5) is not None, (got, want)
    for same in (inf, -inf, float("nan"), 2.5):
        assert compare(torch.tensor([same]), torch.tensor([same]), 0.0, 0.0) is None
    assert not use_triton()  # no tensor to judge by: the reference
    assert not use_triton(torch.zeros(1)) and use_triton(torch.zeros(1), torch.zeros(1)) is False

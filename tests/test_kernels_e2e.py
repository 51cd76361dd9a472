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


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(params=["0", "1"], ids=["eager-decode", "graph-runner"])
def graphs(request, monkeypatch):
    """Decode steps eager, or through the graph runner (captured on a GPU, its static-buffer
    step run eagerly on the CPU)."""
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", request.param)
    return request.param == "1"


def _count_fused_calls(monkeypatch) -> dict:
    """Count calls of the fused ops the model's kernel path uses."""
    from gptfast import ops

    calls = {}
    for name in ("embed_layernorm", "add_layernorm", "linear_gelu", "decode_attention"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            if _name == "decode_attention":
                calls["decode_append"] = calls.get("decode_append", 0) + ("k_new" in kwargs)
                calls["decode_bias"] = calls.get("decode_bias", 0) + (kwargs.get("qkv_bias") is not None)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


def test_greedy_through_kernels_matches_hf(hf, monkeypatch, graphs):
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
    # the fused path ran: per step one embed+LN, two add+LN per layer, K/V appended in attention
    layers = CONFIG.n_layer
    assert calls["embed_layernorm"] >= 6 and calls["add_layernorm"] == 2 * layers * calls["embed_layernorm"]
    assert calls["linear_gelu"] == layers * calls["embed_layernorm"]
    assert calls["decode_append"] == calls["decode_attention"] == layers * (calls["embed_layernorm"] - 1)
    assert calls["decode_bias"] == calls["decode_attention"]  # c_attn's bias added inside attention
    if graphs:
        assert model._graph_runner[1].num_replays == 5


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
    monkeypatch.delenv("GPTFAST_KERNELS", raising=False)
    assert not use_triton()  # no tensor to judge by: the reference
    assert not use_triton(torch.zeros(1)) and use_triton(torch.zeros(1), torch.zeros(1)) is False

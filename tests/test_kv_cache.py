"""The paged KV cache behind generate(): outputs unchanged by paging, block sizes and pool
sizes (preemption), prefix sharing, fan-out, and every block free after every call."""

from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast import GPT2, Engine, SamplingParams, get_config

from checkpoints import make_hf_model


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(get_config("tiny-odd"), seed=3)


def _model(hf, **kwargs):
    return GPT2.from_pretrained(hf, **kwargs)


def _prompts(vocab, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def _all_free(model):
    s = model.kv_cache.stats()
    assert s["free_blocks"] == s["total_blocks"], s
    assert s["running_sequences"] == 0, s


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_greedy_unchanged_by_block_size(hf, block_size):
    prompts = _prompts(hf.config.vocab_size, [17, 1, 33, 8], seed=0)
    ids, mask = _padded(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(ids, do_sample=False, **kw)
    model = _model(hf, block_size=block_size)
    got = gptfast.generate(model, ids, **kw)
    assert torch.equal(got, ref)
    _all_free(model)


def test_small_pool_preempts_and_outputs_are_unchanged(hf):
    prompts = _prompts(hf.config.vocab_size, [30, 12, 25, 40, 7, 19], seed=1)
    ids, mask = _padded(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
    big = _model(hf, block_size=4)
    # 6 sequences of up to 80 tokens need ~120 blocks of 4; 30 forces preemption.
    small = _model(hf, block_size=4, num_kv_blocks=30)
    for sample in (dict(do_sample=False), dict(do_sample=True, top_k=20, seed=5)):
        ref = gptfast.generate(big, ids, **kw, **sample)
        got = gptfast.generate(small, ids, **kw, **sample)
        assert torch.equal(got, ref), sample
        _all_free(small)
    # The engine really preempted.
    engine = Engine(small)
    for p in prompts:
        engine.add(p, SamplingParams(max_new_tokens=40), seeds=[0])
    while engine.has_unfinished():
        engine.step()
    assert engine.num_preemptions > 0
    _all_free(small)


def test_request_that_can_never_fit_is_a_clear_error(hf):
    model = _model(hf, block_size=4, num_kv_blocks=5)  # 4 usable blocks: 16 tokens
    with pytest.raises(ValueError, match="KV blocks"):
        gptfast.generate(model, torch.tensor([list(range(10))]), max_new_tokens=10, pad_token_id=0)
    _all_free(model)


def test_prefix_sharing_reuses_blocks(hf):
    model = _model(hf, block_size=8)
    shared = _prompts(hf.config.vocab_size, [40], seed=2)[0]
    a = torch.tensor([shared + [1, 2, 3]])
    b = torch.tensor([shared + [4, 5]])
    gptfast.generate(model, a, max_new_tokens=4, pad_token_id=0)
    before = model.kv_cache.stats()["prefix_hit_tokens"]
    out = gptfast.generate(model, b, max_new_tokens=4, pad_token_id=0)
    stats = model.kv_cache.stats()
    assert stats["prefix_hit_tokens"] - before == 40  # five full blocks of the shared prefix
    assert stats["cached_blocks"] > 0
    _all_free(model)
    # A cache hit changes nothing in the output.
    fresh = _model(hf, block_size=8)
    assert torch.equal(out, gptfast.generate(fresh, b, max_new_tokens=4, pad_token_id=0))


def test_num_return_sequences_computes_the_prompt_once(hf):
    model = _model(hf, block_size=16)
    prompt = _prompts(hf.config.vocab_size, [45], seed=3)[0]
    engine = Engine(model)
    engine.add(prompt, SamplingParams(max_new_tokens=5, do_sample=True), seeds=list(range(8)))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert engine.num_prefill_tokens == 45
    assert len(outs) == 8 * 5
    _all_free(model)


def test_large_fan_out_with_the_default_pool(hf):
    model = _model(hf)
    prompt = torch.tensor([_prompts(hf.config.vocab_size, [20], seed=4)[0]])
    out = gptfast.generate(model, prompt, max_new_tokens=4, do_sample=True, seed=1,
                           num_return_sequences=2000, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2000, 24)
    assert len({tuple(r) for r in out[:, 20:].tolist()}) > 100
    _all_free(model)


def test_stats_and_pool_configuration(hf):
    model = _model(hf, block_size=8, num_kv_blocks=65)
    s = model.kv_cache.stats()
    assert s["total_blocks"] == 64 and s["free_blocks"] == 64 and s["block_size"] == 8
    assert set(s) >= {"total_blocks", "free_blocks", "cached_blocks", "prefix_hit_tokens"}
    assert model.kv_cache.k.shape == (3, 65, 8, 6, 10)  # [L, blocks, bs, H, D]
    with pytest.raises(ValueError, match="block_size"):
        GPT2.from_config(get_config("tiny"), block_size=0)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        GPT2.from_config(get_config("tiny"), num_kv_blocks=1)


def test_check_weights_keeps_prefixes_only_for_the_same_weights():
    from gptfast.kv_cache import KVCache

    cache = KVCache(get_config("tiny-odd"), block_size=4, num_blocks=16)
    m = cache.manager
    assert not cache.check_weights(("a",))  # nothing recorded yet: not trusted, now recorded
    assert m.allocate_prompt(0, torch.arange(1, 10).numpy()) == 0
    m.free(0)
    assert cache.stats()["cached_blocks"] == 2  # two full blocks of the prompt stay cached
    assert cache.check_weights(("a",)) and cache.stats()["cached_blocks"] == 2
    assert not cache.check_weights(("b",)) and cache.stats()["cached_blocks"] == 0
    assert m.allocate_prompt(1, torch.arange(1, 10).numpy()) == 0  # no prefix hit after the change
    m.free(1)
    assert not cache.check_weights(None) and cache.stats()["cached_blocks"] == 0  # unknown weights
    assert not cache.check_weights(None)

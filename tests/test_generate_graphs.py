"""Every HF-parity test of test_generate.py again, with decode steps through the graph runner
(GPTFAST_CUDA_GRAPHS=1: on the CPU its static-buffer step runs eagerly, on a GPU the CUDA graphs
replay). Each generate() argument must give the same result on the fast path as on HF's."""

from __future__ import annotations

import pytest
import torch
from test_generate import *  # noqa: F401,F403  (the tests and fixtures, collected again here)
from test_generate import _batch, _first_mismatch, _hf_generate

import gptfast
from gptfast import GPT2, get_config, graphs, ops

from checkpoints import make_hf_model


@pytest.fixture(autouse=True)
def _graph_runner_on(monkeypatch):
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")


def test_the_runner_is_used(tiny):
    hf, model = tiny
    model._graph_runner = None
    out = gptfast.generate(model, torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=6, pad_token_id=0)
    assert out.shape == (1, 11)
    assert model._graph_runner[1].num_replays == 5  # every decode step (the prefill makes token 1)


# ------------------------------------------------------------------ the fused greedy head
# A batch whose rows are all greedy, with no logits processor and no score output, ends its graph
# step in ops.layernorm_head_argmax ("greedy"); every option that needs the logits (or a draw)
# keeps the full-logits path ("logits": processors and scores; "sample": the sampler).


def _variants(model) -> dict:
    return dict(model._graph_runner[1].steps_by_variant)


def _greedy_kw(**extra):
    return dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, **extra)


def test_greedy_batch_takes_the_fused_head_with_the_unfused_tokens(tiny, monkeypatch):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [5, 2, 7], seed=21)
    ref = _hf_generate(hf, ids, attention_mask=mask, **_greedy_kw())
    model._graph_runner = None
    got = gptfast.generate(model, ids, attention_mask=mask, **_greedy_kw())
    assert torch.equal(got, ref), _first_mismatch(got, ref)
    assert _variants(model) == {"greedy": 7}  # every decode step (the prefill makes token 1)
    # the unfused step (head to the logits, then the sampler's greedy rows): the same tokens
    monkeypatch.setattr(graphs.DecodeGraphRunner, "has_greedy_head", lambda self, bucket: False)
    model._graph_runner = None
    unfused = gptfast.generate(model, ids, attention_mask=mask, **_greedy_kw())
    assert _variants(model) == {"sample": 7}
    assert torch.equal(unfused, got)


FULL_LOGITS = {  # generate() options whose steps need the logits before the pick
    "repetition_penalty": dict(repetition_penalty=1.4),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[7], [3, 4]]),
    "suppress_tokens": dict(suppress_tokens=[1, 2, 5]),
    "output_scores": dict(return_dict_in_generate=True, output_scores=True),
    "output_logits": dict(return_dict_in_generate=True, output_logits=True),
}


@pytest.mark.parametrize("option", sorted(FULL_LOGITS))
def test_options_that_need_the_logits_keep_the_full_logits_path(tiny, option):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [6, 3], seed=22)
    kw = _greedy_kw(**FULL_LOGITS[option])
    ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
    model._graph_runner = None
    got = gptfast.generate(model, ids, attention_mask=mask, **kw)
    assert _variants(model) == {"logits": 7}, option
    if kw.get("return_dict_in_generate"):
        assert torch.equal(got.sequences, ref.sequences)
        for a, b in zip(got.scores or got.logits, ref.scores or ref.logits):
            assert (a - b).abs().max().item() < 1e-4
    else:
        assert torch.equal(got, ref), (option, _first_mismatch(got, ref))


def test_eos_suppression_takes_the_logits_path_until_min_new_tokens(tiny):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [5, 8], seed=8)
    probe = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    eos = int(probe[1, ids.shape[1]])  # the first token row 1 would produce: masked until index 4
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos, min_new_tokens=5)
    ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
    model._graph_runner = None
    got = gptfast.generate(model, ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref), _first_mismatch(got, ref)
    variants = _variants(model)
    # tokens 1-4 come from steps that mask EOS (the prefill's token 0 too, eagerly); after them
    # the fused head, as long as no row ended
    assert variants["logits"] == 4 and variants.get("greedy", 0) >= 1 and "sample" not in variants, variants


def test_sampling_takes_the_sampler_and_a_mixed_batch_too(tiny):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [4, 6], seed=23)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0, eos_token_id=None)
    model._graph_runner = None
    got = gptfast.generate(model, ids, attention_mask=mask, seed=5, **kw)
    assert _variants(model) == {"sample": 5}
    # the same draws without the graph runner
    with pytest.MonkeyPatch.context() as m:
        m.setenv("GPTFAST_CUDA_GRAPHS", "0")
        eager = gptfast.generate(model, ids, attention_mask=mask, seed=5, **kw)
    assert torch.equal(got, eager)
    # greedy and sampled rows in one batch: the sampler
    model._graph_runner = None
    engine = gptfast.Engine(model, cuda_graphs=True)
    engine.add([3, 1, 4], gptfast.SamplingParams(max_new_tokens=4), seeds=[0])
    engine.add([2, 7], gptfast.SamplingParams(max_new_tokens=4, do_sample=True), seeds=[1])
    assert sum(1 for _ in engine.stream()) == 8
    assert _variants(model) == {"sample": 3}


def test_fused_head_through_the_interpreter_is_the_unfused_path(monkeypatch):
    """GPTFAST_KERNELS=triton: the graph step's head is the Triton `layernorm_head_argmax` (GEMV
    decode kernels, run by the interpreter) and its tokens are the sampler-path tokens and HF's."""
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    hf = make_hf_model(get_config("tiny"), seed=4)
    model = GPT2.from_pretrained(hf)
    calls = []
    fused = ops.layernorm_head_argmax

    def recording(x, *args, **kwargs):
        calls.append(ops.use_triton(x))
        return fused(x, *args, **kwargs)

    monkeypatch.setattr(ops, "layernorm_head_argmax", recording)
    ids = torch.tensor([[11, 7, 300, 2], [0, 0, 5, 999]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = dict(_greedy_kw(), max_new_tokens=5)
    ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
    got = gptfast.generate(model, ids, attention_mask=mask, **kw)
    assert _variants(model) == {"greedy": 4} and calls == [True] * 4
    assert torch.equal(got, ref), _first_mismatch(got, ref)
    monkeypatch.setattr(graphs.DecodeGraphRunner, "has_greedy_head", lambda self, bucket: False)
    model._graph_runner = None
    unfused = gptfast.generate(model, ids, attention_mask=mask, **kw)
    assert _variants(model) == {"sample": 4} and len(calls) == 4
    assert torch.equal(unfused, got)


def test_fused_head_with_a_step_in_flight_and_eos_one_step_late():
    """Batch 1, two steps in flight: the next step's input is the fused head's argmax on the
    device; an EOS seen one step late shows no extra token; every block comes back."""
    model = GPT2.from_config(get_config("tiny-odd"), seed=3, block_size=4)
    prompt = [5, 9, 2]

    def run(cuda_graphs, params):
        model.kv_cache.reset_prefix_cache()
        engine = gptfast.Engine(model, cuda_graphs=cuda_graphs)
        engine.add(prompt, params, seeds=[0])
        tokens = [o.token for o in engine.stream()]
        stats = model.kv_cache.stats()
        assert stats["free_blocks"] == stats["total_blocks"], stats
        return tokens, engine

    free_run, _ = run(False, gptfast.SamplingParams(max_new_tokens=16))
    eos = next(t for i, t in enumerate(free_run) if i >= 6 and t not in free_run[:i])
    params = gptfast.SamplingParams(max_new_tokens=16, eos_token_ids=(eos,))
    model._graph_runner = None
    got, engine = run(True, params)
    assert got == free_run[:free_run.index(eos) + 1]
    assert engine.num_steps_ahead > 0
    # the steps launched ahead included the one after EOS, never shown
    assert _variants(model) == {"greedy": len(got)}

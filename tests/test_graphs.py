"""The decode graph runner (gptfast/graphs.py) and the engine's fast decode path.

On the CPU the runner runs its static-buffer step eagerly (nothing to capture): these tests check
that path's bookkeeping (bucket padding, buffers filled in place, logits processors, the eager
fallback above the largest bucket) against the engine's plain eager decode, token for token.
The `gpu` tests capture real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast import GPT2, Engine, SamplingParams, get_config
from gptfast import graphs as graphs_mod
from gptfast.graphs import buckets_up_to, graph_runner


def _model(**kwargs):
    return GPT2.from_config(get_config("tiny-odd"), seed=1, **kwargs)


PROMPTS = [[5, 9, 2], list(range(1, 12)), [7], list(range(40, 61)), [3, 3, 3, 3, 8]]


def _serve(model, params_list, cuda_graphs, seeds=None, keep_scores=False, max_num_seqs=256,
           cancel_after=None):
    """Run every prompt with its params; returns ({request index: tokens}, engine)."""
    model.kv_cache.reset_prefix_cache()  # every run prefills alike (no hits from the last one)
    engine = Engine(model, keep_scores=keep_scores, cuda_graphs=cuda_graphs, max_num_seqs=max_num_seqs)
    ids = {}
    for i, (prompt, params) in enumerate(zip(PROMPTS, params_list)):
        [sid] = engine.add(prompt, params, seeds=[seeds[i] if seeds else i])
        ids[sid] = i
    got: dict[int, list] = {i: [] for i in ids.values()}
    scores: dict[int, list] = {i: [] for i in ids.values()}
    for out in engine.stream():
        got[ids[out.seq_id]].append(out.token)
        if keep_scores:
            scores[ids[out.seq_id]].append(out.scores)
        if cancel_after is not None and out.index == cancel_after[1] and ids[out.seq_id] == cancel_after[0]:
            engine.cancel(out.seq_id)
    stats = model.kv_cache.stats()
    assert stats["free_blocks"] == stats["total_blocks"], stats
    model.kv_cache.manager.check_invariants()
    return (got, scores), engine


def test_buckets():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(5) == [1, 2, 3, 4, 5]
    b = buckets_up_to(256)
    assert b[:8] == list(range(1, 9)) and b[-1] == 256 and b == sorted(set(b))
    assert buckets_up_to(100)[-2:] == [96, 100]
    with pytest.raises(ValueError, match="max_batch"):
        buckets_up_to(0)


MIXES = {
    "greedy": [SamplingParams(max_new_tokens=n) for n in (9, 4, 12, 7, 10)],
    "sampled": [SamplingParams(max_new_tokens=n, do_sample=True, top_k=k, top_p=p, temperature=t)
                for n, k, p, t in ((9, 0, 1.0, 1.0), (4, 30, 1.0, 0.7), (12, 0, 0.8, 1.3),
                                   (7, 5, 0.9, 1.0), (10, 0, 1.0, 1.0))],
    # some rows need the logits processors (graph stops at the logits), others do not
    "processors": [SamplingParams(max_new_tokens=9, repetition_penalty=1.4),
                   SamplingParams(max_new_tokens=8, min_new_tokens=6, eos_token_ids=(996, 3)),
                   SamplingParams(max_new_tokens=12, do_sample=True, top_k=40),
                   SamplingParams(max_new_tokens=7, eos_token_ids=(996,)),
                   SamplingParams(max_new_tokens=10, do_sample=True, repetition_penalty=0.8)],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_static_decode_matches_eager_decode(mix):
    model = _model(block_size=4)
    (want, _), eager = _serve(model, MIXES[mix], cuda_graphs=False)
    (got, _), fast = _serve(model, MIXES[mix], cuda_graphs=True)
    assert eager.runner is None and fast.runner is graph_runner(model)
    assert got == want
    assert fast.runner.num_replays > 0
    assert all(len(t) > 0 for t in got.values())


def test_static_decode_scores_match_eager():
    model = _model()
    params = MIXES["processors"]
    (want, want_scores), _ = _serve(model, params, cuda_graphs=False, keep_scores=True)
    (got, got_scores), _ = _serve(model, params, cuda_graphs=True, keep_scores=True)
    assert got == want
    for i in want_scores:
        for a, b in zip(got_scores[i], want_scores[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_static_decode_with_preemption_cancel_and_small_buckets(monkeypatch):
    # 3 + 2 blocks of 4 tokens: sequences are preempted and recomputed; the runner's buckets stop
    # at 2 rows, so steps with more rows take the eager fallback.
    model = _model(block_size=4, num_kv_blocks=14)
    params = MIXES["sampled"]
    (want, _), _ = _serve(model, params, cuda_graphs=False, cancel_after=(2, 3))
    monkeypatch.setattr(graphs_mod, "MAX_BATCH", 2)  # the model has no runner yet: it is built this small
    (got, _), fast = _serve(model, params, cuda_graphs=True, cancel_after=(2, 3))
    assert got == want
    assert len(got[2]) == 4  # cancelled after its 4th token
    assert fast.runner.max_batch == 2 and fast.runner.num_replays > 0
    assert fast.num_preemptions > 0


def test_num_return_sequences_through_the_static_path(monkeypatch):
    model = _model()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    kw = dict(max_new_tokens=10, do_sample=True, top_p=0.95, num_return_sequences=5, seed=11, pad_token_id=0)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    want = gptfast.generate(model, ids, **kw)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    got = gptfast.generate(model, ids, **kw)
    assert torch.equal(got, want)
    assert len({tuple(r) for r in got.tolist()}) > 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_padding_rows_write_nothing(device):
    """A batch of 5 runs in the bucket of 5..; with the runner limited to buckets of 8, 3 padding
    rows go through the step: only the 5 real slots of the cache may change."""
    model = _model(block_size=4, device=device)
    # one step in flight: the decode step below is exactly one replay
    engine = Engine(model, cuda_graphs=True, max_num_seqs=8, steps_in_flight=1)
    for i, p in enumerate(PROMPTS):
        engine.add(p, SamplingParams(max_new_tokens=3), seeds=[i])
    engine.step()  # prefill of all five
    runner = engine.runner
    runner.buckets = [8]  # force padding rows
    cache = model.kv_cache
    k0, v0 = cache.k.clone(), cache.v.clone()
    engine.step()  # decode
    slots = runner.dev.slot_mapping[:8].tolist()  # as the step used them
    assert runner.num_replays == 1
    slots, padding = slots[:5], slots[5:]
    assert padding == [-1, -1, -1]
    bs = cache.block_size
    changed = ((cache.k != k0) | (cache.v != v0)).flatten(3).any(-1).any(0)  # [blocks, bs]
    where = {int(b) * bs + int(r) for b, r in changed.nonzero().tolist()}
    assert where == set(slots), (where, slots)
    engine.abort()


def test_runner_is_kept_per_model_and_rebuilt_when_weights_are_replaced():
    model = _model()
    a = graph_runner(model)
    assert graph_runner(model) is a
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.add_(0.01)  # in place: the graphs still see it
    assert graph_runner(model) is a
    model.h[0].mlp.c_fc.weight = torch.nn.Parameter(model.h[0].mlp.c_fc.weight.clone(), requires_grad=False)
    b = graph_runner(model)
    assert b is not a
    model.to(torch.float16)
    assert graph_runner(model) is not b


def test_noop_moves_keep_the_cache_and_graphs_and_real_ones_stop_live_engines():
    model = _model()
    cache, runner = model.kv_cache, graph_runner(model)
    model.to("cpu")
    model.float()
    assert model.kv_cache is cache and graph_runner(model) is runner
    engine = Engine(model, cuda_graphs=True)
    engine.add([1, 2, 3], SamplingParams(max_new_tokens=4), seeds=[0])
    engine.step()
    model.to(torch.float16)
    with pytest.raises(RuntimeError, match="moved or cast while this Engine was using it"):
        engine.step()


def test_a_live_engine_follows_replaced_parameters():
    """Replacing a parameter tensor mid-generation: the engine's next decode step uses a runner
    built for the new tensors, and the tokens are those of an eager engine doing the same."""

    def run(cuda_graphs):
        model = _model()
        engine = Engine(model, cuda_graphs=cuda_graphs)
        [sid] = engine.add(PROMPTS[1], SamplingParams(max_new_tokens=10), seeds=[0])
        tokens, first = [], graph_runner(model) if cuda_graphs else None
        for out in engine.stream():
            tokens.append(out.token)
            if out.index == 3:
                fc = model.h[0].mlp.c_fc
                fc.weight = torch.nn.Parameter(torch.randn_like(fc.weight), requires_grad=False)
        if cuda_graphs:
            assert engine.runner is graph_runner(model) and engine.runner is not first
        return tokens

    torch.manual_seed(0)
    want = run(False)
    torch.manual_seed(0)
    assert run(True) == want


def test_the_runner_does_not_keep_its_model_alive():
    import gc
    import weakref

    model = _model()
    Engine(model, cuda_graphs=True).add([1, 2], SamplingParams(max_new_tokens=2), seeds=[0])
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None, "a reference cycle keeps the model (and its cache) alive"
    finally:
        gc.enable()


def test_graph_setting_from_the_environment(monkeypatch):
    model = _model()
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    assert Engine(model).runner is not None
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    assert Engine(model).runner is None
    assert Engine(model, cuda_graphs=True).runner is not None
    monkeypatch.delenv("GPTFAST_CUDA_GRAPHS")
    assert Engine(model).runner is None  # the CPU default
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="GPTFAST_CUDA_GRAPHS must be 0, 1 or unset, got 'yes'"):
        Engine(model)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Engine(model, max_num_seqs=0, cuda_graphs=False)


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decode_matches_eager_on_gpu(dtype):
    model = GPT2.from_config(get_config("tiny-odd"), seed=1, dtype=dtype, device="cuda")
    for mix in ("greedy", "sampled", "processors"):
        (want, _), _ = _serve(model, MIXES[mix], cuda_graphs=False)
        (got, _), fast = _serve(model, MIXES[mix], cuda_graphs=True)
        assert fast.runner.captured and fast.runner.capture_seconds > 0
        assert got == want, mix


@pytest.mark.gpu
def test_reference_ops_turn_the_graphs_off_on_gpu(monkeypatch):
    model = GPT2.from_config(get_config("tiny"), seed=0, device="cuda")
    monkeypatch.setenv("GPTFAST_KERNELS", "reference")
    assert Engine(model).runner is None
    with pytest.raises(ValueError, match="cannot capture the eager reference ops"):
        Engine(model, cuda_graphs=True)
    out = gptfast.generate(model, torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=4)
    assert out.shape == (1, 7)


@pytest.mark.gpu
def test_cuda_graph_runner_captures_each_bucket_on_first_use_once():
    model = GPT2.from_config(get_config("tiny"), seed=0, device="cuda")
    runner = graph_runner(model)
    assert runner.capture_seconds == 0 and runner.buckets_captured("sample") == []
    assert runner.buckets == buckets_up_to(256)
    out = gptfast.generate(model, torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=8)
    assert out.shape == (1, 11)
    assert runner.num_replays == 7  # one per decode step (the first token comes from the prefill)
    # a greedy batch of one row: only its fused-head graph
    assert runner.buckets_captured("greedy") == [1] and runner.buckets_captured("sample") == []
    prompts = torch.tensor([[1, 2, 3]] * 3, device="cuda")
    gptfast.generate(model, prompts, max_new_tokens=4, do_sample=True, seed=0)
    assert runner.buckets_captured("sample") == [3]
    seconds = runner.capture_seconds
    gptfast.generate(model, torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=8)
    gptfast.generate(model, prompts, max_new_tokens=4, do_sample=True, seed=0)
    assert graph_runner(model) is runner and runner.capture_seconds == seconds

"""The engine under hostile use: threads sharing one model, steps that fail, engines dropped or
competing for one small pool, weights changed under a live engine, bad arguments, and a seeded
fuzz loop over add / fork / cancel / step checked against each request run alone."""

from __future__ import annotations

import gc
import random
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import gptfast
from gptfast import Engine, SamplingParams

from engine_helpers import TINY
from engine_helpers import alone as _alone
from engine_helpers import assert_clean as _clean
from engine_helpers import tiny_model as _model


def _poison(model):
    """NaN in every K/V slot, so that reading a slot nobody wrote shows in the tokens."""
    model.kv_cache.k.fill_(float("nan"))
    model.kv_cache.v.fill_(float("nan"))


def _drain(engine):
    got: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.seq_id, []).append(out.token)
    return got


# ---------------------------------------------------------------------------- 1. threads
def test_a_prefix_hit_never_reads_kv_another_thread_has_not_written(monkeypatch):
    """Thread A's prefill is slow; thread B, admitted meanwhile with the same prefix, must not
    read A's blocks before A wrote them."""
    model = _model(block_size=4)
    _poison(model)
    prefix = list(range(10, 22))  # three full blocks
    real = model.forward_paged

    calls = []

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # A's prefill: B is admitted and computes meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward_paged", slow)
    results, errors = {}, []

    def run(name, prompt, delay):
        time.sleep(delay)
        try:
            out = gptfast.generate(model, torch.tensor([prompt]), max_new_tokens=4, pad_token_id=0)
            results[name] = out[0, len(prompt):].tolist()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", prefix + [1], 0.0)),
               threading.Thread(target=run, args=("b", prefix + [2, 3], 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    monkeypatch.undo()
    assert results["a"] == _alone(prefix + [1], 4)
    assert results["b"] == _alone(prefix + [2, 3], 4)
    _clean(model)


def test_many_threads_on_one_fresh_model_get_each_request_alone():
    """The chat-demo pattern: one model, many threads calling generate(), first calls racing."""
    model = _model(block_size=4, num_kv_blocks=40)
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 999) for _ in range(n)] for n in (8, 13)]
    jobs = []
    for i in range(24):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 999) for _ in range(rng.randrange(1, 6))]
        sample = i % 3 == 0
        jobs.append((prompt, dict(max_new_tokens=rng.randrange(2, 8), do_sample=sample,
                                  **({"top_k": 20, "seed": i} if sample else {}))))
    want = [_run_alone_generate(p, kw) for p, kw in jobs]
    got, errors = [None] * len(jobs), []
    start = threading.Barrier(8)

    def worker(w):
        start.wait()
        for j in range(w, len(jobs), 8):
            prompt, kw = jobs[j]
            try:
                out = gptfast.generate(model, torch.tensor([prompt]), pad_token_id=0, **kw)
                got[j] = out[0, len(prompt):].tolist()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    bad = [j for j in range(len(jobs)) if got[j] != want[j]]
    assert not bad, f"{len(bad)} of {len(jobs)} calls got wrong tokens, e.g. {bad[:3]}"
    _clean(model)


def test_threads_making_first_calls_on_a_fresh_model_share_one_kv_cache(monkeypatch):
    """The cache is created on first use: threads racing there must not each create one (an
    engine would then find its cache replaced and refuse to step)."""
    import gptfast.model as model_module

    real = model_module.KVCache

    def slow_cache(*args, **kwargs):
        time.sleep(0.05)  # widen the window between the check and the assignment
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "KVCache", slow_cache)
    model = _model()
    errors, start = [], threading.Barrier(4)

    def worker(i):
        start.wait()
        try:
            gptfast.generate(model, torch.tensor([[1 + i, 2, 3]]), max_new_tokens=3, pad_token_id=0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _clean(model)


def _run_alone_generate(prompt, kw):
    out = gptfast.generate(_model(), torch.tensor([prompt]), pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_a_streamer_that_calls_generate_on_the_same_model_does_not_deadlock():
    # 9 blocks: the outer call's prompt holds 5 when the streamer runs, the inner call needs 6
    model = _model(block_size=4, num_kv_blocks=10)
    inner = []

    class Nested:
        def put(self, tokens):
            if tokens.dim() == 1 and not inner:  # first generated step of the outer call
                out = gptfast.generate(model, torch.tensor([[7, 8, 9, 10, 11]]), max_new_tokens=20,
                                       pad_token_id=0)
                inner.append(out[0, 5:].tolist())

        def end(self):
            pass

    outer = gptfast.generate(model, torch.tensor([list(range(1, 20))]), max_new_tokens=16,
                             pad_token_id=0, streamer=Nested())
    assert inner[0] == _alone([7, 8, 9, 10, 11], 20)
    assert outer[0, 19:].tolist() == _alone(list(range(1, 20)), 16)
    _clean(model)


# ---------------------------------------------------------------------------- 2. failed steps
@pytest.mark.parametrize("then", ["cancel", "new-engine"])
def test_a_failed_prefill_leaves_no_prefix_hash_for_unwritten_blocks(monkeypatch, then):
    model = _model(block_size=4)
    _poison(model)
    prompt = list(range(1, 20))
    engine = Engine(model)
    [sid] = engine.add(prompt, SamplingParams(max_new_tokens=3), seeds=[0])

    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward_paged", boom)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    monkeypatch.undo()
    if then == "cancel":
        engine.cancel(sid)
        assert _drain_one(engine, prompt, 3) == _alone(prompt, 3)
    else:
        del engine
        assert _drain_one(Engine(model), prompt, 3) == _alone(prompt, 3)
    _clean(model)


def test_a_failed_decode_step_can_be_retried(monkeypatch):
    """After a failed step the engine is consistent: stepping again gives the run-alone tokens."""
    model = _model(block_size=4)
    _poison(model)
    prompt = list(range(1, 8))  # the decode step fills block 2 (positions 4..7)
    engine = Engine(model)
    [sid] = engine.add(prompt, SamplingParams(max_new_tokens=6), seeds=[0])
    got = [o.token for o in engine.step()]
    real = model.forward_paged
    calls = []

    def fail_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("transient")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward_paged", fail_once)
    with pytest.raises(RuntimeError, match="transient"):
        engine.step()
    got += _drain(engine).get(sid, [])
    assert got == _alone(prompt, 6)
    out = gptfast.generate(model, torch.tensor([prompt + got[:1]]), max_new_tokens=3, pad_token_id=0)
    assert out[0, 8:].tolist() == got[1:4]
    _clean(model)


# ---------------------------------------------------------------------------- 3. lifetime
def test_an_engine_dropped_without_abort_gives_its_blocks_back():
    model = _model(block_size=4, num_kv_blocks=12)
    engine = Engine(model)
    engine.add(list(range(1, 30)), SamplingParams(max_new_tokens=10), seeds=[0])
    engine.step()
    assert model.kv_cache.stats()["free_blocks"] < model.kv_cache.stats()["total_blocks"]
    ref = weakref.ref(engine)
    del engine
    assert ref() is None, "something keeps a dropped Engine alive"
    _clean(model)
    out = gptfast.generate(model, torch.tensor([list(range(1, 40))]), max_new_tokens=5, pad_token_id=0)
    assert out[0, 39:].tolist() == _alone(list(range(1, 40)), 5)


def test_an_engine_in_a_reference_cycle_is_collected_and_frees_its_blocks():
    model = _model(block_size=4, num_kv_blocks=12)
    engine = Engine(model)
    engine.add(list(range(1, 30)), SamplingParams(max_new_tokens=10), seeds=[0])
    engine.step()
    engine.me = engine  # a user's cycle: the garbage collector frees it
    del engine
    gc.collect()
    _clean(model)


@pytest.mark.parametrize("when", ["admission", "decode"])
def test_a_pool_held_outside_every_engine_is_reported_as_such(when):
    """Blocks held by a sequence no live Engine knows (here: taken straight from the block
    manager) are named as the cause, not the engine's own bookkeeping or the pool's size."""
    model = _model(block_size=4, num_kv_blocks=12)  # 11 blocks
    held = 9 if when == "admission" else 6
    model.kv_cache.manager.allocate_prompt(10**9, np.arange(500, 500 + 4 * held))
    engine = Engine(model)
    engine.add(list(range(1, 13)), SamplingParams(max_new_tokens=16), seeds=[0])  # 3 blocks, then 7
    with pytest.raises(RuntimeError, match=r"1 held outside any live Engine"):
        _drain(engine)
    engine.abort()
    model.kv_cache.manager.free(10**9)
    _clean(model)


# ---------------------------------------------------------------------------- 4. weights
def test_a_live_engine_notices_in_place_weight_changes():
    model = _model(block_size=4)
    engine = Engine(model)
    prompt = list(range(1, 18))
    before = _drain_one(engine, prompt, 5)
    with torch.no_grad():  # K/V change a lot: the cached prompt blocks are stale
        for block in model.h:
            block.attn.c_attn.weight.mul_(-8.0)
            block.attn.c_proj.weight.mul_(8.0)
    want = _alone(prompt, 5, model=model)
    assert want != before, "the weight change must change the tokens for this test to mean anything"
    assert _drain_one(engine, prompt, 5) == want
    _clean(model)


def test_unchanged_weights_keep_the_prefix_cache_across_engines():
    model = _model(block_size=4)
    prompt = list(range(1, 18))
    first = Engine(model)
    want = _drain_one(first, prompt, 3)
    second = Engine(model)
    assert _drain_one(second, prompt, 3) == want
    assert second.num_prefill_tokens == 1  # 16 prompt tokens reused, the last one computed


def _drain_one(engine, prompt, new):
    [sid] = engine.add(prompt, SamplingParams(max_new_tokens=new), seeds=[0])
    return _drain(engine)[sid]


# ---------------------------------------------------------------------------- 5. two engines
@pytest.mark.parametrize("schedule", ["round-robin", "b-alone-first"])
def test_two_engines_on_one_small_pool_both_finish_with_their_own_tokens(schedule):
    model = _model(block_size=4, num_kv_blocks=12)  # 11 blocks: each request fits alone, not both
    pa, pb = list(range(1, 25)), list(range(30, 50))
    a, b = Engine(model), Engine(model)
    [sa] = a.add(pa, SamplingParams(max_new_tokens=16), seeds=[0])
    [sb] = b.add(pb, SamplingParams(max_new_tokens=20), seeds=[0])
    got = {sa: [], sb: []}
    if schedule == "round-robin":
        while a.has_unfinished() or b.has_unfinished():
            for e in (a, b):
                for o in e.step():
                    got[o.seq_id].append(o.token)
    else:
        for o in a.step():  # a holds most of the pool
            got[o.seq_id].append(o.token)
        for e in (b, a):
            for sid, toks in _drain(e).items():
                got[sid] += toks
    assert got[sa] == _alone(pa, 16) and got[sb] == _alone(pb, 20)
    _clean(model)


# ---------------------------------------------------------------------------- 6. add / cancel / stream
def _state(engine):
    return (len(engine.scheduler.seqs), engine.has_unfinished(), engine.cache.stats())


@pytest.mark.parametrize("case, error", [
    ("eos-beyond-vocab", ValueError), ("seed-above-int64", ValueError),
    ("seed-below-int64", ValueError), ("float-token", TypeError), ("bool-token", TypeError),
    ("float-tensor", TypeError), ("2d-tensor", ValueError), ("bool-seed", TypeError),
    ("not-params", TypeError), ("negative-token", ValueError),
])
def test_add_refuses_bad_arguments_before_taking_any_state(case, error):
    engine = Engine(_model())
    before = _state(engine)
    prompt, params, seeds = [1, 2, 3], SamplingParams(max_new_tokens=2), [0]
    if case == "eos-beyond-vocab":
        params = SamplingParams(max_new_tokens=2, eos_token_ids=(5, TINY.vocab_size))
    elif case == "seed-above-int64":
        seeds = [2**63]
    elif case == "seed-below-int64":
        seeds = [0, -2**63 - 1]
    elif case == "float-token":
        prompt = [1, 2.0, 3]
    elif case == "bool-token":
        prompt = [1, True]
    elif case == "float-tensor":
        prompt = torch.tensor([1.0, 2.0])
    elif case == "2d-tensor":
        prompt = torch.tensor([[1, 2]])
    elif case == "bool-seed":
        seeds = [False]
    elif case == "not-params":
        params = {"max_new_tokens": 2}
    else:
        prompt = np.array([1, -2])
    with pytest.raises(error) as err:
        engine.add(prompt, params, seeds)
    assert any(w in str(err.value) for w in ("prompt", "seed", "eos", "params")), err.value
    assert _state(engine) == before
    assert engine.step() == []


@pytest.mark.parametrize("kind", ["numpy-int32", "numpy-uint16", "tensor-int64", "tuple"])
def test_add_accepts_1d_arrays_and_tensors(kind):
    prompt = [5, 6, 7, 8, 9]
    arg = {"numpy-int32": np.array(prompt, np.int32), "numpy-uint16": np.array(prompt, np.uint16),
           "tensor-int64": torch.tensor(prompt), "tuple": tuple(prompt)}[kind]
    engine = Engine(_model())
    [sid] = engine.add(arg, SamplingParams(max_new_tokens=4), seeds=[np.int64(0)])
    assert _drain(engine)[sid] == _alone(prompt, 4)


def test_cancel_of_an_unknown_id_raises_key_error():
    engine = Engine(_model())
    [sid] = engine.add([1, 2], SamplingParams(max_new_tokens=1), seeds=[0])
    other = Engine(engine.model)
    [foreign] = other.add([3, 4], SamplingParams(max_new_tokens=1), seeds=[0])
    for bad in (sid + 1000, foreign, -1):
        with pytest.raises(KeyError, match="never issued by this Engine"):
            engine.cancel(bad)
    _drain(engine)
    engine.cancel(sid)  # finished: nothing to do
    other.abort()


class _NoScanDeque:
    """Stands in for the waiting queue: fails on anything that walks it."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name in ("remove", "index", "count", "__contains__", "__iter__"):
            raise AssertionError(f"the waiting queue was scanned ({name})")
        return getattr(self.inner, name)

    def __contains__(self, item):
        raise AssertionError("the waiting queue was scanned (in)")

    def __iter__(self):
        raise AssertionError("the waiting queue was scanned (iteration)")

    def __len__(self):
        return len(self.inner)

    def __bool__(self):
        return bool(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def test_cancelling_waiting_requests_does_not_scan_the_queue():
    engine = Engine(_model())
    params = SamplingParams(max_new_tokens=1)
    ids = [engine.add([1 + i % 900, 2], params, seeds=[0])[0] for i in range(10_000)]
    forks = engine.add([3, 4, 5], SamplingParams(max_new_tokens=2, do_sample=True), seeds=[1, 2, 3])
    engine.scheduler.waiting = _NoScanDeque(engine.scheduler.waiting)
    for sid in ids[:-3]:
        engine.cancel(sid)
    engine.cancel(forks[1])  # a fork child not started yet
    engine.cancel(forks[0])  # its parent: the other child runs on its own
    engine.scheduler.waiting = engine.scheduler.waiting.inner
    got = _drain(engine)
    assert sorted(got) == sorted(ids[-3:] + [forks[2]])
    assert got[forks[2]] == _alone([3, 4, 5], 2, seed=3, do_sample=True)
    _clean(engine.model)


def test_breaking_out_of_stream_loses_no_output():
    model = _model()
    engine = Engine(model)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    ids = [engine.add(p, SamplingParams(max_new_tokens=5), seeds=[0])[0] for p in prompts]
    got: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.stream():
            got.setdefault(out.seq_id, []).append(out.token)
            break  # the consumer leaves after every single output
    for sid, p in zip(ids, prompts):
        assert got[sid] == _alone(p, 5)
    _clean(model)


def test_a_step_that_raises_for_one_row_keeps_the_other_rows_outputs():
    model = _model()
    engine = Engine(model)
    [good] = engine.add([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=6), seeds=[0])
    every_token_masked = SamplingParams(max_new_tokens=6, min_new_tokens=2, do_sample=True,
                                        eos_token_ids=tuple(range(TINY.vocab_size)))
    engine.add([6, 7, 8], every_token_masked, seeds=[1])
    tokens = []
    with pytest.raises(gptfast.engine.NonFiniteLogitsError):
        while engine.has_unfinished():
            tokens += [o.token for o in engine.step() if o.seq_id == good]
    tokens += _drain(engine).get(good, [])
    assert tokens == _alone([1, 2, 3, 4, 5], 6)
    _clean(model)


# ---------------------------------------------------------------------------- fuzz
def _fuzz_requests(rng, vocab):
    prefixes = [[rng.randrange(1, vocab) for _ in range(n)] for n in (3, 8, 9, 17)]
    return prefixes


def test_engine_fuzz_against_each_request_alone():
    """A seeded loop of >= 2,000 random operations on a tiny pool (add with shared prefixes,
    forks, requests that can never fit, cancels, steps); every greedy request that was not
    cancelled gets exactly its run-alone tokens, and no block leaks."""
    block_size = 4
    model = _model(block_size=block_size, num_kv_blocks=14)  # 13 usable blocks, 52 slots
    cuda_graphs_engine = [Engine(model, max_num_seqs=6), Engine(model, max_num_seqs=3, cuda_graphs=True)]
    rng = random.Random(1234)
    prefixes = _fuzz_requests(rng, TINY.vocab_size - 1)
    alone_cache: dict[tuple, list[int]] = {}
    reference = _model()

    def alone(prompt, new):
        key = tuple(prompt)
        if key not in alone_cache:  # no EOS ids: the first `new` of 11 tokens are the answer
            alone_cache[key] = _alone_on(reference, prompt, 11)
        return alone_cache[key][:new]

    requests = {}  # seq_id -> (engine index, prompt, max_new, is greedy)
    got: dict[int, list[int]] = {}
    cancelled, ops, refused = set(), 0, 0
    while ops < 2000:
        ops += 1
        e_idx = rng.randrange(2)
        engine = cuda_graphs_engine[e_idx]
        r = rng.random()
        if r < 0.22:
            prompt = rng.choice(prefixes)[:rng.randrange(1, 18)] + \
                [rng.randrange(1, TINY.vocab_size - 1) for _ in range(rng.randrange(0, 4))]
            if not prompt:
                prompt = [1]
            new = rng.randrange(1, 12)
            n = 1 if rng.random() < 0.7 else rng.randrange(2, 4)
            try:
                ids = engine.add(prompt, SamplingParams(max_new_tokens=new, do_sample=n > 1, top_k=5),
                                 seeds=list(range(n)))
            except ValueError:
                refused += 1
                continue
            for sid in ids:
                requests[sid] = (e_idx, prompt, new, n == 1)
        elif r < 0.25:  # can never fit the pool
            with pytest.raises(ValueError, match="KV blocks"):
                engine.add(list(range(1, 50)), SamplingParams(max_new_tokens=20), seeds=[0])
        elif r < 0.32:
            live = [s for s, (e, *_) in requests.items() if e == e_idx and s not in cancelled
                    and s in engine.scheduler.seqs]
            if live:
                sid = rng.choice(live)
                engine.cancel(sid)
                cancelled.add(sid)
        else:
            for out in engine.step():
                got.setdefault(out.seq_id, []).append(out.token)
                if out.finished:
                    assert out.seq_id not in engine.scheduler.seqs
    for engine in cuda_graphs_engine:
        for sid, toks in _drain(engine).items():
            got.setdefault(sid, []).extend(toks)
    checked = 0
    for sid, (e_idx, prompt, new, greedy) in requests.items():
        toks = got.get(sid, [])
        if sid in cancelled:
            assert len(toks) <= new
            if greedy:
                assert toks == alone(prompt, new)[:len(toks)], f"cancelled seq {sid}"
            continue
        assert len(toks) == new, f"seq {sid}: {len(toks)} of {new} tokens"
        if greedy:
            assert toks == alone(prompt, new), f"seq {sid} prompt {prompt}"
            checked += 1
    assert checked > 100 and len(cancelled) > 20
    assert sum(e.num_preemptions for e in cuda_graphs_engine) > 0
    assert model.kv_cache.manager.prefix_hit_tokens > 0
    _clean(model)


def _alone_on(model, prompt, new):
    model.kv_cache.reset_prefix_cache()
    engine = Engine(model)
    [sid] = engine.add(prompt, SamplingParams(max_new_tokens=new), seeds=[0])
    return _drain(engine)[sid]

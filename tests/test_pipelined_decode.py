"""Decode steps in flight (gptfast/engine.py `_complete_inflight`, gptfast/graphs.py `launch_next`).

On the static path (cuda_graphs=True; on the CPU the runner's step runs eagerly on the same
buffers) the engine launches step t+1 before it reads step t's tokens. These tests record the
order of launches and host reads, and check that nothing the user sees changes: tokens equal to
an eager engine's (greedy and seeded sampling), EOS seen one step late without an extra token,
max_new_tokens exact, cancel with a step in flight, no block leaked, and the K/V the extra step
wrote is the true K/V of its token (a later prompt that reuses those cached blocks gets the same
tokens as without the prefix cache).
"""

from __future__ import annotations

import pytest

from gptfast import GPT2, Engine, SamplingParams, get_config
from gptfast import graphs as graphs_mod


def _model(**kwargs):
    return GPT2.from_config(get_config("tiny-odd"), seed=3, **kwargs)


@pytest.fixture
def recorder(monkeypatch):
    """Records ("launch", id) for every sampling step launched on a runner and ("read", id) for
    every host read of a step's tokens, in order."""
    log = []
    runner_cls, slot_cls = graphs_mod.DecodeGraphRunner, graphs_mod.OutputSlot
    launch, launch_next, read = runner_cls.launch, runner_cls.launch_next, slot_cls.read

    def rec_launch(self, batch, out):
        i = launch(self, batch, out)
        out.last_launch = i
        log.append(("launch", i))
        return i

    def rec_launch_next(self, batch, new_blocks, after, out):
        i = launch_next(self, batch, new_blocks, after, out)
        out.last_launch = i
        log.append(("launch", i))
        return i

    def rec_read(self, batch):
        log.append(("read", self.last_launch))
        return read(self, batch)

    monkeypatch.setattr(runner_cls, "launch", rec_launch)
    monkeypatch.setattr(runner_cls, "launch_next", rec_launch_next)
    monkeypatch.setattr(slot_cls, "read", rec_read)
    return log


def _run(model, prompts, params, steps_in_flight=2, cuda_graphs=True, seeds=None):
    model.kv_cache.reset_prefix_cache()
    engine = Engine(model, cuda_graphs=cuda_graphs, steps_in_flight=steps_in_flight)
    ids = [engine.add(p, params[i] if isinstance(params, list) else params,
                      seeds=[seeds[i] if seeds else i])[0] for i, p in enumerate(prompts)]
    got = {sid: [] for sid in ids}
    for out in engine.stream():
        got[out.seq_id].append(out.token)
    stats = model.kv_cache.stats()
    assert stats["free_blocks"] == stats["total_blocks"], stats  # no block leaked
    model.kv_cache.manager.check_invariants()
    return [got[sid] for sid in ids], engine


def test_batch1_launches_the_next_step_before_reading_the_last(recorder):
    # block_size 4: the 14 decode steps cross several block boundaries (blocks named ahead)
    model = _model(block_size=4)
    params = SamplingParams(max_new_tokens=15)
    [want], _ = _run(model, [[5, 9, 2]], params, cuda_graphs=False)
    recorder.clear()
    [got], engine = _run(model, [[5, 9, 2]], params)
    assert got == want and len(got) == 15
    launches = [i for what, i in recorder if what == "launch"]
    reads = [i for what, i in recorder if what == "read"]
    assert launches == sorted(launches) and reads == launches  # every step read once, in order
    assert len(launches) == 14  # one per decode step: nothing computed past max_new_tokens
    for t in launches[:-1]:  # step t + 1 was launched before the host waited for step t
        assert recorder.index(("launch", t + 1)) < recorder.index(("read", t)), recorder
    assert engine.num_steps_ahead == 13


def test_one_step_in_flight_reads_each_step_before_the_next(recorder):
    model = _model(block_size=4)
    [got], engine = _run(model, [[5, 9, 2]], SamplingParams(max_new_tokens=6), steps_in_flight=1)
    assert len(got) == 6 and engine.num_steps_ahead == 0
    assert recorder == [(what, i) for i in range(recorder[0][1], recorder[0][1] + 5) for what in ("launch", "read")]


SAMPLED = [SamplingParams(max_new_tokens=n, do_sample=True, top_k=k, top_p=p, temperature=t)
           for n, k, p, t in ((13, 0, 1.0, 1.0), (9, 30, 1.0, 0.7), (12, 0, 0.8, 1.3))]
PROMPTS = [[5, 9, 2], list(range(1, 12)), [7, 7]]


@pytest.mark.parametrize("batch", [1, 3])
def test_seeded_sampling_is_the_same_with_one_and_two_steps_in_flight(batch):
    model = _model(block_size=4)
    runs = {}
    for depth, graphs in ((1, True), (2, True), (1, False)):
        runs[depth, graphs], engine = _run(model, PROMPTS[:batch], SAMPLED[:batch], steps_in_flight=depth,
                                           cuda_graphs=graphs, seeds=[11, 12, 13])
        if depth == 2:
            assert engine.num_steps_ahead > 0
    assert runs[2, True] == runs[1, True] == runs[1, False]
    assert [len(t) for t in runs[2, True]] == [p.max_new_tokens for p in SAMPLED[:batch]]


def test_eos_seen_one_step_late_shows_no_extra_token_and_its_kv_is_true(recorder):
    model = _model(block_size=4)
    prompt = [5, 9, 2]
    [free_run], _ = _run(model, [prompt], SamplingParams(max_new_tokens=20), cuda_graphs=False)
    # an EOS id the greedy run produces at index 8 (its first occurrence), on a block boundary
    # or not depending on the prompt length: the extra step's K/V lands in a named block
    eos = next(t for i, t in enumerate(free_run) if i >= 8 and t not in free_run[:i])
    stop = free_run.index(eos)
    params = SamplingParams(max_new_tokens=20, eos_token_ids=(eos,))
    recorder.clear()
    [got], engine = _run(model, [prompt], params)
    assert got == free_run[:stop + 1]  # ends on EOS, nothing after it
    launches = [i for what, i in recorder if what == "launch"]
    reads = [i for what, i in recorder if what == "read"]
    assert len(launches) == stop + 1 and reads == launches[:-1]  # the extra step is never read
    # The extra step wrote the K/V of the EOS token into blocks that were then freed (and, when
    # full, cached): a prompt that reuses them must continue as it does without the prefix cache.
    longer = prompt + got + [1, 2, 3, 4, 5]
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(model, cuda_graphs=True)
    [sid] = engine.add(longer, params, seeds=[0])
    cached = [o.token for o in engine.stream()]
    assert model.kv_cache.manager.prefix_hit_tokens > 0
    model.kv_cache.reset_prefix_cache()
    [fresh], _ = _run(model, [longer], params, cuda_graphs=False)
    assert cached == fresh


def test_cancel_with_a_step_in_flight():
    model = _model(block_size=4)
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=10)]
    (want, _) = _run(model, PROMPTS[:2], params, cuda_graphs=False)
    for batch in (1, 2):
        model.kv_cache.reset_prefix_cache()
        engine = Engine(model, cuda_graphs=True)
        ids = [engine.add(p, params[i], seeds=[i])[0] for i, p in enumerate(PROMPTS[:batch])]
        got = {sid: [] for sid in ids}
        for out in engine.stream():
            got[out.seq_id].append(out.token)
            if out.seq_id == ids[0] and out.index == 4:
                assert engine._inflight is not None  # the next step is already launched
                engine.cancel(ids[0])
        assert got[ids[0]] == want[0][:5]
        if batch == 2:
            assert got[ids[1]] == want[1]
        stats = model.kv_cache.stats()
        assert stats["free_blocks"] == stats["total_blocks"], stats
        model.kv_cache.manager.check_invariants()


def test_steps_in_flight_is_checked():
    model = _model()
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match="steps_in_flight must be 1 or 2"):
            Engine(model, steps_in_flight=bad)

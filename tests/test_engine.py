"""The engine used directly (add / step / cancel): requests joining over time, several engines on
one model, errors mid-step, and argument checks."""

from __future__ import annotations

import pytest
import torch

import gptfast
from gptfast import Engine, SamplingParams
from gptfast.engine import NonFiniteLogitsError

from engine_helpers import alone as _alone
from engine_helpers import assert_clean as _clean
from engine_helpers import tiny_model as _model


def test_requests_joining_over_time_match_each_alone():
    model = _model(block_size=4, num_kv_blocks=24)
    engine = Engine(model)
    prompts = [list(range(1, 1 + n)) for n in (9, 3, 14, 6)]
    params = SamplingParams(max_new_tokens=12, do_sample=True, top_k=20)
    got: dict[int, list[int]] = {}
    ids = {}
    steps = 0
    while steps == 0 or engine.has_unfinished():
        if steps < len(prompts):  # a new request every step
            [ids[steps]] = engine.add(prompts[steps], params, seeds=[steps])
        for out in engine.step():
            got.setdefault(out.seq_id, []).append(out.token)
        steps += 1
    for i, p in enumerate(prompts):
        assert got[ids[i]] == _alone(p, 12, seed=i, do_sample=True, top_k=20), f"request {i}"
    assert not engine.scheduler.seqs, "finished sequences are not kept"
    _clean(model)


def test_two_engines_share_one_model():
    model = _model()
    a, b = Engine(model), Engine(model)
    [sa] = a.add([1, 2, 3], SamplingParams(max_new_tokens=5), seeds=[0])
    [sb] = b.add([4, 5, 6, 7], SamplingParams(max_new_tokens=5), seeds=[0])
    assert sa != sb
    outs_a, outs_b = [], []
    while a.has_unfinished() or b.has_unfinished():
        outs_a += [o.token for o in a.step()]
        outs_b += [o.token for o in b.step()]
    assert outs_a == _alone([1, 2, 3], 5) and outs_b == _alone([4, 5, 6, 7], 5)
    _clean(model)


def test_an_error_before_the_prefill_frees_everything(monkeypatch):
    model = _model(block_size=4)
    engine = Engine(model)
    engine.add(list(range(1, 20)), SamplingParams(max_new_tokens=3), seeds=[0])

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptfast.batch, "block_tables", boom)  # building the prefill batch fails
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    monkeypatch.undo()
    engine.abort()
    _clean(model)
    assert model.kv_cache.stats()["cached_blocks"] == 0  # hashes of never-written blocks dropped
    out = gptfast.generate(model, torch.tensor([list(range(1, 20))]), max_new_tokens=3, pad_token_id=0)
    assert out[0, 19:].tolist() == _alone(list(range(1, 20)), 3)


def test_a_row_with_no_drawable_token_fails_alone():
    model = _model()
    V = model.config.vocab_size
    engine = Engine(model)
    [good] = engine.add([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=6), seeds=[0])
    bad_params = SamplingParams(max_new_tokens=6, min_new_tokens=2, do_sample=True,
                                eos_token_ids=tuple(range(V)))
    [bad] = engine.add([6, 7, 8], bad_params, seeds=[1])
    with pytest.raises(NonFiniteLogitsError) as err:
        while engine.has_unfinished():
            engine.step()
    assert err.value.seq_id == bad
    # The engine stays consistent: the other sequence finishes with its own tokens.
    tokens = []
    while engine.has_unfinished():
        tokens += [o.token for o in engine.step() if o.seq_id == good]
    assert len(tokens) >= 1
    _clean(model)


def test_capacity_check_counts_only_tokens_that_need_a_slot():
    model = _model(block_size=4, num_kv_blocks=3)  # 2 usable blocks: 8 slots
    out = gptfast.generate(model, torch.tensor([list(range(1, 9))]), max_new_tokens=1, pad_token_id=0)
    assert out.shape == (1, 9)
    _clean(model)


@pytest.mark.parametrize("case", ["no-new-tokens", "bad-token", "too-long", "no-seed", "empty"])
def test_add_checks_its_arguments(case):
    engine = Engine(_model())
    P = engine.model.config.n_positions
    with pytest.raises(ValueError):
        if case == "no-new-tokens":
            engine.add([1], SamplingParams(max_new_tokens=0), seeds=[0])
        elif case == "bad-token":
            engine.add([1, 5000], SamplingParams(max_new_tokens=1), seeds=[0])
        elif case == "too-long":
            engine.add([1] * P, SamplingParams(max_new_tokens=1), seeds=[0])
        elif case == "no-seed":
            engine.add([1], SamplingParams(max_new_tokens=1), seeds=[])
        else:
            engine.add([], SamplingParams(max_new_tokens=1), seeds=[0])


def test_cancel_of_a_finished_sequence_is_a_no_op():
    engine = Engine(_model())
    [sid] = engine.add([1, 2], SamplingParams(max_new_tokens=1), seeds=[0])
    while engine.has_unfinished():
        engine.step()
    engine.cancel(sid)
    _clean(engine.model)


def test_stream_accepts_requests_and_cancels_while_streaming():
    model = _model(block_size=4)
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=10, do_sample=True, top_p=0.9)
    [a] = engine.add([1, 2, 3, 4], params, seeds=[5])
    got: dict[int, list[int]] = {a: []}
    b = None
    for out in engine.stream():
        got.setdefault(out.seq_id, []).append(out.token)
        if out.seq_id == a and out.index == 2:
            [b] = engine.add([9, 8, 7], params, seeds=[6])
        if out.seq_id == a and out.index == 6:
            engine.cancel(a)
    assert got[a] == _alone([1, 2, 3, 4], 10, seed=5, do_sample=True, top_p=0.9)[:7]
    assert got[b] == _alone([9, 8, 7], 10, seed=6, do_sample=True, top_p=0.9)
    assert not engine.has_unfinished()
    _clean(model)

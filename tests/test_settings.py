"""Runtime options: the environment read once, as defaults (gptfast/settings.py); the ops' backend
as an explicit context (`gptfast.ops.backend`); the engine's stages and their hand-off objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptfast import GPT2, Engine, SamplingParams, get_config, ops
from gptfast.batch import SamplingRows, build_decode, newest_tokens
from gptfast.graphs import graph_runner
from gptfast.scheduler import Scheduler
from gptfast.sequence import FinishReason, SampleStatus, SequenceStatus
from gptfast.settings import RuntimeOptions


def test_options_from_the_environment(monkeypatch):
    monkeypatch.delenv("GPTFAST_KERNELS", raising=False)
    monkeypatch.delenv("GPTFAST_CUDA_GRAPHS", raising=False)
    assert RuntimeOptions.from_environment() == RuntimeOptions("auto", None)
    monkeypatch.setenv("GPTFAST_KERNELS", " Triton ")
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    assert RuntimeOptions.from_environment() == RuntimeOptions("triton", False)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    assert RuntimeOptions.from_environment().cuda_graphs is True
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "true")
    with pytest.raises(ValueError, match="GPTFAST_CUDA_GRAPHS must be 0, 1 or unset, got 'true'"):
        RuntimeOptions.from_environment()
    # an explicit option wins, and the malformed variable it replaces is not read
    assert RuntimeOptions.with_defaults(cuda_graphs=False) == RuntimeOptions("triton", False)
    monkeypatch.setenv("GPTFAST_KERNELS", "fast")
    with pytest.raises(ValueError, match="GPTFAST_KERNELS must be one of .* got 'fast'"):
        RuntimeOptions.with_defaults(cuda_graphs=False)
    assert RuntimeOptions.with_defaults("reference", True) == RuntimeOptions("reference", True)
    with pytest.raises(ValueError, match="kernels must be one of"):
        RuntimeOptions("cuda")
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None, got 1"):
        RuntimeOptions("auto", 1)


def test_graphs_default_to_cuda_models_without_the_reference_ops():
    assert RuntimeOptions("auto").use_graphs("cuda") and not RuntimeOptions("auto").use_graphs("cpu")
    assert not RuntimeOptions("reference").use_graphs("cuda")
    assert RuntimeOptions("triton", True).use_graphs("cpu")  # the static-buffer step, run eagerly
    with pytest.raises(ValueError, match="cannot capture the eager reference ops"):
        RuntimeOptions("reference", True).use_graphs("cuda")


def test_ops_backend_is_a_context_not_the_environment(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")  # read by engines when built, never by the ops
    assert ops.kernel_backend() == "auto" and not ops.use_triton(x)
    with ops.backend("triton"):
        assert ops.kernel_backend() == "triton" and ops.use_triton(x)
        with ops.backend("reference"), ops.as_cuda(132):
            assert not ops.use_triton(x)  # forced off even where the CUDA branches are taken
        assert ops.use_triton(x)
    assert ops.kernel_backend() == "auto"
    with pytest.raises(ValueError, match="ops.backend: name must be one of"), ops.backend("cuda"):
        pass


def _model(**kwargs):
    return GPT2.from_config(get_config("tiny"), seed=0, **kwargs)


def test_the_engine_runs_its_ops_on_the_backend_it_was_built_with(monkeypatch):
    model = _model()
    seen = []
    real = ops.sample
    monkeypatch.setattr(ops, "sample", lambda *a, **k: seen.append(ops.kernel_backend()) or real(*a, **k))
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    by_env = Engine(model)
    explicit = Engine(model, kernels="reference")
    monkeypatch.setenv("GPTFAST_KERNELS", "reference")  # too late for by_env: read when it was built
    outs = {}
    for name, engine in (("env", by_env), ("explicit", explicit)):
        engine.add([1, 2, 3], SamplingParams(max_new_tokens=3), seeds=[7])
        outs[name] = [o.token for o in engine.stream()]
        assert seen == [{"env": "triton", "explicit": "reference"}[name]] * 3, name
        seen.clear()
    assert outs["env"] == outs["explicit"]  # greedy: the same tokens on both backends
    assert by_env.options == RuntimeOptions("triton", None) and by_env.runner is None
    with pytest.raises(ValueError, match="kernels must be one of"):
        Engine(model, kernels="fast")


def test_finish_reasons_and_statuses_are_enums_that_read_as_before():
    model = _model()
    probe = Engine(model)
    probe.add([1, 2, 3], SamplingParams(max_new_tokens=1), seeds=[0])
    [first] = [o.token for o in probe.stream()]  # the greedy first token: made an EOS id below
    engine = Engine(model)
    [a, b, c] = [engine.add([1, 2, 3], SamplingParams(max_new_tokens=n, eos_token_ids=e), seeds=[0])[0]
                 for n, e in ((2, ()), (5, ()), (5, (first,)))]
    seqs = dict(engine.scheduler.seqs)
    engine.cancel(b)
    assert seqs[b].finish_reason is FinishReason.STOP and seqs[b].status is SequenceStatus.FINISHED
    while engine.has_unfinished():
        engine.step()
    assert seqs[a].finish_reason is FinishReason.LENGTH and seqs[c].finish_reason is FinishReason.EOS
    for reason, text in ((FinishReason.EOS, "eos"), (FinishReason.LENGTH, "length"),
                         (FinishReason.STOP, "stop"), (FinishReason.ERROR, "error")):
        assert reason == text and str(reason) == text and f"{reason}" == text
    assert [int(s) for s in SampleStatus] == [0, 1, 2] and SequenceStatus.RUNNING == "running"


def test_the_runner_loads_a_decode_batch_and_copies_sampling_rows_only_when_they_change():
    model = _model(block_size=4)
    engine = Engine(model, cuda_graphs=False)
    for i in range(12):
        engine.add([1 + i, 2, 3][:1 + i % 3], SamplingParams(max_new_tokens=4, do_sample=True, top_k=5 + i),
                   seeds=[100 + i])
    engine.step()  # the prefill: twelve running sequences, one token each
    sched = engine.scheduler
    seqs = list(sched.running)
    ids, tokens = Scheduler.ids(seqs), newest_tokens(seqs)
    with model.kv_cache.lock:
        slots = sched.append_slots(ids, tokens)
    rows = SamplingRows.of(seqs)
    batch = build_decode(sched.manager, seqs, ids, tokens, slots, rows)
    assert batch.positions.tolist() == [len(s.tokens) - 1 for s in seqs] and len(batch) == 12
    assert batch.block_tables.shape == (12, -(-max(len(s.tokens) for s in seqs) // 4))
    runner = graph_runner(model, 16)
    runner.load(batch)
    host = runner.host
    assert host.seeds[:12].tolist() == list(range(100, 112)) and host.top_k[:12].tolist() == list(range(5, 17))
    assert host.tokens[:12].tolist() == tokens.tolist() and host.slot_mapping[:12].tolist() == slots.tolist()
    width = batch.block_tables.shape[1]
    assert np.array_equal(host.block_tables[:12, :width].numpy(), batch.block_tables)
    assert not host.block_tables[:12, width:].any()
    rows.seeds[:] = -1  # the same rows object again: not copied
    runner.load(batch)
    assert host.seeds[:12].tolist() == list(range(100, 112))
    runner.run(9, sample=False)  # bucket 16: rows 9.. are cleared, so the rows must be copied again
    assert host.seeds[9:12].tolist() == [0, 0, 0]
    runner.load(batch)
    assert host.seeds[:12].tolist() == [-1] * 12
    engine.abort()


def test_gemv_decode_reaches_beam_search_and_nested_contexts_keep_it(monkeypatch):
    import gptfast.beam

    seen = []

    def spy(model, prompts, params, **options):
        seen.append(options)
        return "searched"

    monkeypatch.setattr(gptfast.beam, "beam_search", spy)
    model = GPT2.from_config(get_config("tiny"), seed=0)
    engine = Engine(model, gemv_decode=False, cuda_graphs=False)
    assert engine.beam_search([[1, 2, 3]], SamplingParams(max_new_tokens=2), num_beams=2) == "searched"
    assert seen[-1]["gemv_decode"] is False and seen[-1]["kernels"] == "auto"
    assert ops.gemv_decode_enabled()  # outside any context
    with ops.backend("auto", gemv_decode=False):
        with ops.backend("triton"):  # None: the enclosing context's choice stays
            assert not ops.gemv_decode_enabled() and ops.kernel_backend() == "triton"
        with ops.backend("reference", gemv_decode=True):
            assert ops.gemv_decode_enabled()
    with pytest.raises(ValueError, match="gemv_decode must be True, False or None"):
        with ops.backend("auto", gemv_decode="off"):
            pass

"""The CTranslate2 contender of the e2e suite (optional: skipped when ctranslate2 is absent)."""

from __future__ import annotations

import sys

import pytest
import torch

from gptfast.bench import e2e


@pytest.fixture(scope="module")
def hf_tiny():
    return e2e.build_hf_model("tiny", seed=0)[0]


def test_skipped_with_a_note_when_not_installed(monkeypatch, tmp_path, hf_tiny):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    generators, note = e2e.ctranslate2_generators(hf_tiny, "tiny", tmp_path, threads=1)
    assert generators == {}
    assert "CTranslate2 not installed" in note and "gptfast[ctranslate2]" in note


def test_converted_generators_give_hf_greedy_tokens(tmp_path, hf_tiny):
    pytest.importorskip("ctranslate2")
    generators, note = e2e.ctranslate2_generators(hf_tiny, "tiny", tmp_path, threads=1)
    assert list(generators) == [e2e.CT2_FP32, e2e.CT2_INT8], note
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    ids[mask == 0] = e2e.PAD_ID
    with torch.inference_mode():
        expected = hf_tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=e2e.PAD_ID)
    fp32, int8 = (generate(ids, mask, 6) for generate in generators.values())
    assert torch.equal(fp32, expected), f"CTranslate2 float32 {fp32.tolist()} vs HF {expected.tolist()}"
    assert int8.shape == expected.shape and torch.equal(int8[:, :7], ids)


def test_streamed_tokens_are_timestamped(tmp_path, hf_tiny):
    pytest.importorskip("ctranslate2")
    generate = e2e.ctranslate2_generators(hf_tiny, "tiny", tmp_path, threads=1)[0][e2e.CT2_FP32]
    prompt = torch.arange(1, 9)[None]
    streamer = e2e.TimingStreamer(prompt.shape[1])
    out = generate(prompt, torch.ones_like(prompt), 5, streamer)
    assert len(streamer.times) == 5 and streamer.ended is not None
    assert out.shape == (1, 13)


def test_ctranslate2_runs_only_in_its_worker_process(monkeypatch, tmp_path, hf_tiny):
    """This process never touches ctranslate2 (its OpenMP runtime would slow the PyTorch contenders
    timed after it): with an empty stand-in module here, the worker still converts, loads and
    generates."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("ctranslate2")
    if spec is None:
        pytest.skip("ctranslate2 is not installed")
    stand_in = types.ModuleType("ctranslate2")
    stand_in.__spec__ = spec  # found, but any use here would raise AttributeError
    monkeypatch.setitem(sys.modules, "ctranslate2", stand_in)
    generators, note = e2e.ctranslate2_generators(hf_tiny, "tiny", tmp_path, threads=1)
    assert "process of its own" in note
    prompt = torch.arange(1, 6)[None]
    out = generators[e2e.CT2_FP32](prompt, torch.ones_like(prompt), 3)
    with torch.inference_mode():
        expected = hf_tiny.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=e2e.PAD_ID)
    assert torch.equal(out, expected)


def test_a_worker_that_cannot_start_skips_the_rows_with_its_reason(tmp_path):
    """The worker reports a failed conversion through the pipe: the rows are skipped, the note
    says why, and nothing hangs."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    pytest.importorskip("ctranslate2")

    class Unconvertible:
        config = SimpleNamespace(vocab_size=16)

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True)
            Path(folder, "config.json").write_text(json.dumps({"model_type": "not-a-model"}))

    generators, note = e2e.ctranslate2_generators(Unconvertible(), "tiny", tmp_path, threads=1)
    assert generators == {}
    assert note.startswith("CTranslate2 rows skipped: its worker process failed to start: "), note

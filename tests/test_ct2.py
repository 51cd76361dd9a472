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

"""Every HF-parity test of test_generate.py again, with decode steps through the graph runner
(GPTFAST_CUDA_GRAPHS=1: on the CPU its static-buffer step runs eagerly, on a GPU the CUDA graphs
replay). Each generate() argument must give the same result on the fast path as on HF's."""

from __future__ import annotations

import pytest

from test_generate import *  # noqa: F401,F403  (the tests and fixtures, collected again here)


@pytest.fixture(autouse=True)
def _graph_runner_on(monkeypatch):
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")


def test_the_runner_is_used(tiny):
    hf, model = tiny
    model._graph_runner = None
    out = gptfast.generate(model, torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=6, pad_token_id=0)
    assert out.shape == (1, 11)
    assert model._graph_runner[1].num_replays == 5  # every decode step (the prefill makes token 1)

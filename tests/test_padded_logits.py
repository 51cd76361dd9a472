"""The decode graphs' logits rows padded to a multiple of 64 elements (gptfast/graphs.py
`LOGITS_ROW_ALIGN`): the head writes a (B, V) view of a [B, round_up(V, 64)] buffer, and the
sampler takes the row stride. A padded stride must change nothing: the same samples as a
contiguous copy, and the pad columns never read (poisoned here with NaN, which would flag the row,
or with a huge value, which would win every draw)."""

from __future__ import annotations

import pytest
import torch

from gptfast import GPT2, Engine, SamplingParams, get_config, graphs, ops
from gptfast.ops import ln_linear, sampling


def _padded(logits: torch.Tensor, poison: float) -> torch.Tensor:
    """`logits` [B, V] as a view of a [B, round_up(V, 64)] buffer whose pad columns hold `poison`."""
    B, V = logits.shape
    width = -(-V // graphs.LOGITS_ROW_ALIGN) * graphs.LOGITS_ROW_ALIGN
    assert width > V  # the test vocabularies are not multiples of 64
    rows = torch.full((B, width), poison, dtype=logits.dtype)
    rows[:, :V] = logits
    return rows[:, :V]


# greedy rows, plain sampling, top-k with a temperature, top-p: each reads the row differently
_TEMPERATURE = [0.0, 0.0, 1.0, 0.7, 1.3, 1.0]
_TOP_K = [0, 0, 0, 40, 0, 5]
_TOP_P = [1.0, 1.0, 1.0, 1.0, 0.8, 0.9]


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("V", [997, 2500], ids=["one-chunk", "split"])  # 2500: pass 1 split over 3 chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_row_stride_gives_identical_samples(impl, V, dtype):
    fn = sampling.sample if impl == "triton" else sampling.sample_ref
    B = len(_TEMPERATURE)
    gen = torch.Generator().manual_seed(V)
    logits = (3 * torch.randn(B, V, generator=gen)).to(dtype)
    logits[1, 17] = logits[1, 900] = logits[1].max() + 1  # a tie at the max: the lowest id wins
    args = (torch.tensor(_TEMPERATURE), torch.tensor(_TOP_K, dtype=torch.int32), torch.tensor(_TOP_P),
            sampling.row_seeds(7, B, "cpu"), torch.arange(B, dtype=torch.int64) * 3)
    want_tokens, want_status = fn(logits.contiguous(), *args)
    assert want_status.tolist() == [0] * B and want_tokens[1].item() == 17
    for poison in (float("nan"), 1e30 if dtype == torch.float32 else 1e38):
        view = _padded(logits, poison)
        assert view.stride(0) % 64 == 0 and view.stride(0) > V
        tokens, status = fn(view, *args)
        assert status.tolist() == [0] * B, f"a pad column was read (poison {poison})"
        assert tokens.tolist() == want_tokens.tolist()


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_head_writes_the_padded_view_and_leaves_the_pad(impl):
    fn = ln_linear.layernorm_linear if impl == "triton" else ln_linear.layernorm_linear_ref
    gen = torch.Generator().manual_seed(1)
    R, K, V = 3, 48, 997
    x = torch.randn(R, K, generator=gen)
    lnw, lnb = 1 + 0.1 * torch.randn(K, generator=gen), 0.1 * torch.randn(K, generator=gen)
    w = 0.1 * torch.randn(V, K, generator=gen)
    want = fn(x, lnw, lnb, 1e-5, w, None)
    view = _padded(torch.full((R, V), float("nan")), -7.0)
    got = fn(x, lnw, lnb, 1e-5, w, None, out=view)
    assert got is view
    assert torch.allclose(view, want, atol=1e-5, rtol=1e-5)
    assert (view.as_strided((R, view.stride(0)), view.stride())[:, V:] == -7.0).all()  # the pad untouched
    with pytest.raises(ValueError, match="last dimension contiguous"):
        fn(x, lnw, lnb, 1e-5, w, None, out=torch.empty(V, R).t())
    with pytest.raises(ValueError, match=r"\[R, N\] = \(3, 997\)"):
        fn(x, lnw, lnb, 1e-5, w, None, out=torch.empty(R, V + 1))


def test_graph_steps_read_logits_rows_padded_to_64(monkeypatch):
    """The static-buffer step (GPTFAST_CUDA_GRAPHS=1 on the CPU): the sampler graph's and the
    logits graph's logits have a row stride of round_up(V, 64); the tokens are the eager engine's."""
    model = GPT2.from_config(get_config("tiny-odd"), seed=3)  # V = 997
    V = model.config.vocab_size
    strides = []
    sample, run = ops.sample, graphs.DecodeGraphRunner.run

    def recording_sample(logits, *args, **kwargs):
        strides.append(("sample", logits.stride(0)))
        return sample(logits, *args, **kwargs)

    def recording_run(self, batch, sample):
        out = run(self, batch, sample)
        if not sample:
            strides.append(("logits", out.stride(0)))
        return out

    prompts = [[5, 9, 2], [4, 4, 1, 8]]
    for params in (SamplingParams(max_new_tokens=4, do_sample=True, top_k=50),
                   SamplingParams(max_new_tokens=4, repetition_penalty=1.3)):
        runs = []
        for cuda_graphs in (False, True):
            strides.clear()
            model.kv_cache.reset_prefix_cache()
            with monkeypatch.context() as m:
                m.setattr(ops, "sample", recording_sample)
                m.setattr(graphs.DecodeGraphRunner, "run", recording_run)
                engine = Engine(model, cuda_graphs=cuda_graphs)
                ids = [engine.add(p, params, seeds=[i])[0] for i, p in enumerate(prompts)]
                got = {sid: [] for sid in ids}
                for out in engine.stream():
                    got[out.seq_id].append(out.token)
            runs.append([got[sid] for sid in ids])
        assert runs[0] == runs[1]
        padded = [kind for kind, stride in strides if stride == 1024]
        # 3 decode steps at batch 2: the sampler graph, or the logits graph then the processors
        # (in place) and the eager sampler, on the same padded rows
        assert padded == (["sample"] * 3 if params.do_sample else ["logits", "sample"] * 3), strides
        assert all(stride in (V, 1024) for _, stride in strides), strides

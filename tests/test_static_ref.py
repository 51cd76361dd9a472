"""The benchmark's static-cache eager reference (gptfast/bench/static_ref.py): greedy tokens equal to
HF's and gptfast's, stale cache slots masked, arguments checked, and one compiled graph for every step."""

import re

import pytest
import torch

from gptfast import GPT2, generate, get_config
from gptfast.bench.static_ref import StaticCacheGenerator

from checkpoints import make_hf_model

CONFIG = get_config("tiny-odd")  # vocab 997, 96 positions, 3 layers, 6 heads of 10


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model(CONFIG, seed=11)
    return hf, GPT2.from_pretrained(hf)


def _prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=gen)


def _hf_greedy(hf, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)


def _first_difference(expected: torch.Tensor, got: torch.Tensor) -> str:
    diff = (expected != got).nonzero()
    if diff.numel() == 0:
        return "identical"
    row, col = diff[0].tolist()
    return (f"{len(diff)} tokens differ, first at row {row} col {col}: "
            f"expected {expected[row, col]}, got {got[row, col]}")


@pytest.mark.parametrize("batch,length,new,max_len", [
    (1, 7, 20, 27),    # the cache exactly as long as the run
    (1, 1, 12, None),  # a one-token prompt; 83 cache slots never written
    (3, 13, 9, 40),    # rows of one length, no padding
], ids=["b1-tight", "b1-prompt1-full-cache", "b3"])
def test_greedy_tokens_match_hf_and_gptfast(models, batch, length, new, max_len):
    hf, model = models
    ids = _prompts(batch, length, seed=length)
    expected = _hf_greedy(hf, ids, new)
    got = StaticCacheGenerator(model, batch_size=batch, max_len=max_len).generate(ids, new)
    assert got.shape == (batch, length + new)
    assert torch.equal(got, expected), _first_difference(expected, got)
    assert len(set(expected[:, length:].flatten().tolist())) > 1, "degenerate weights: one token only"
    ours = generate(model, input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, ours), _first_difference(ours, got)


def test_a_reused_generator_ignores_what_an_earlier_call_left(models):
    hf, model = models
    gen = StaticCacheGenerator(model, batch_size=1, max_len=60)
    long = _prompts(1, 40, seed=1)
    gen.generate(long, 20)  # fills slots 0..58
    short = _prompts(1, 5, seed=2)
    expected = _hf_greedy(hf, short, 15)
    got = gen.generate(short, 15)
    assert torch.equal(got, expected), _first_difference(expected, got)


class Recorder:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        assert not self.ended
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_each_token(models):
    _, model = models
    ids = _prompts(1, 6, seed=3)
    streamer = Recorder()
    out = StaticCacheGenerator(model, batch_size=1, max_len=20).generate(ids, 8, streamer=streamer)
    assert streamer.ended and len(streamer.puts) == 1 + 8
    assert torch.equal(streamer.puts[0], ids)
    assert [p.shape for p in streamer.puts[1:]] == [torch.Size([1])] * 8
    assert torch.equal(torch.cat(streamer.puts[1:]), out[0, 6:])


@pytest.mark.parametrize("make,call,message", [
    (dict(batch_size=0), None, "batch_size must be an int >= 1, got 0"),
    (dict(max_len=97), None, "max_len must be an int in [2, n_positions=96], got 97"),
    (dict(batch_size=2), ((1, 4), 3), "input_ids has 1 rows; this generator was built for batch_size 2"),
    (dict(max_len=10), ((1, 4), 7), "4 prompt + 7 new tokens do not fit in max_len 10"),
    (dict(max_len=10), ((1, 4), 0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_len=10), ((4,), 3), "input_ids must be a 2-D tensor"),
], ids=["batch0", "max_len-too-long", "rows", "too-long", "new0", "1-D"])
def test_arguments_are_checked(models, make, call, message):
    _, model = models
    with pytest.raises(ValueError, match=re.escape(message)):
        gen = StaticCacheGenerator(model, **make)
        shape, new = call
        gen.generate(torch.randint(0, CONFIG.vocab_size, shape), new)


def _compiled_run(model, device: str):
    """(tokens of two calls through the compiled step, the eager tokens, dynamo's counters)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ids = _prompts(1, 9, seed=4).to(device)
    compiled = StaticCacheGenerator(model, batch_size=1, max_len=40, compile=True, mode="reduce-overhead")
    first = compiled.generate(ids, 24)
    second = compiled.generate(ids, 24)
    eager = StaticCacheGenerator(model, batch_size=1, max_len=40).generate(ids, 24)
    return first, second, eager, {k: dict(v) for k, v in counters.items()}


@pytest.mark.slow
def test_reduce_overhead_compile_on_the_cpu_traces_once_and_matches(models):
    # ~50 s with a cold inductor cache on 2 cores, ~5 s warm. On the CPU inductor skips the CUDA
    # graphs (one recorded skip) and compiles the step alone.
    hf, model = models
    first, second, eager, counters = _compiled_run(model, "cpu")
    expected = _hf_greedy(hf, _prompts(1, 9, seed=4), 24)
    assert torch.equal(eager, expected), _first_difference(expected, eager)
    assert torch.equal(first, expected), _first_difference(expected, first)
    assert torch.equal(second, expected), _first_difference(expected, second)
    assert counters["stats"]["unique_graphs"] == 1, counters  # one trace for 2 x 23 steps


@pytest.mark.gpu
def test_reduce_overhead_compile_on_cuda_replays_one_cuda_graph(models):
    hf, _ = models
    cuda = GPT2.from_pretrained(hf, device="cuda")
    first, second, eager, counters = _compiled_run(cuda, "cuda")
    expected = _hf_greedy(hf, _prompts(1, 9, seed=4), 24)
    for name, got in (("eager", eager), ("first", first), ("second", second)):
        assert torch.equal(got.cpu(), expected), f"{name}: {_first_difference(expected, got.cpu())}"
    assert counters["stats"]["unique_graphs"] == 1, counters
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, counters

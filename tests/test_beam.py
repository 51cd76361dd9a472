"""Beam search against HF (fp32, token for token; sequences_scores within 1e-4) and its KV
memory on the paged cache (beams share blocks; nothing left behind)."""

from __future__ import annotations

import warnings

import pytest
import torch

import gptfast
from gptfast import GPT2, GPT2Config, SamplingParams, get_config
from gptfast.beam import beam_search

from checkpoints import PARITY_CONFIGS as CONFIGS
from checkpoints import make_hf_model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf = make_hf_model(CONFIGS[request.param], seed=7)
    return hf, GPT2.from_pretrained(hf, block_size=4)


def _batch(vocab, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = 0
    return ids, mask


def _hf(hf, ids, mask, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, **kw)


def _compare(want, got, kw):
    assert torch.equal(got.sequences, want.sequences), (
        f"{kw}\ngptfast {got.sequences.tolist()}\nHF      {want.sequences.tolist()}")
    assert torch.equal(got.beam_indices, want.beam_indices), kw
    assert got.beam_indices.dtype == want.beam_indices.dtype
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-4, rtol=0)
    assert len(got.scores) == len(want.scores)
    for a, b in zip(got.scores, want.scores):
        assert a.shape == b.shape and torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a[~a.isinf()], b[~b.isinf()], atol=1e-4, rtol=0)
    assert (got.logits is None) == (want.logits is None)
    for a, b in zip(got.logits or (), want.logits or ()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _cases(eos_a, eos_b):
    return [
        dict(num_beams=3),
        dict(num_beams=4, num_return_sequences=3, length_penalty=0.5, early_stopping=True,
             eos_token_id=eos_a),
        dict(num_beams=3, early_stopping="never", length_penalty=2.0, eos_token_id=[eos_a, eos_b]),
        dict(num_beams=5, num_return_sequences=5, eos_token_id=eos_b, no_repeat_ngram_size=2,
             repetition_penalty=1.2, min_new_tokens=2),
        dict(num_beams=2, length_penalty=-1.0, eos_token_id=eos_a, early_stopping=False,
             bad_words_ids=[[eos_b]], suppress_tokens=[3]),
    ]


def test_beam_search_matches_hf_single_and_padded_batch(pair):
    hf, model = pair
    V = hf.config.vocab_size
    ids, mask = _batch(V, [6, 3, 5], seed=1)
    # EOS ids that beams actually pick: the tokens of a plain beam search's output, so that
    # hypotheses end early and compete with running ones
    plain = _hf(hf, ids, mask, num_beams=3, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    eos_a, eos_b = plain[0, -3].item(), plain[1, -2].item()
    for i, kw in enumerate(_cases(eos_a, eos_b)):
        kw = {"max_new_tokens": 7, "pad_token_id": 0, "eos_token_id": None,
              "return_dict_in_generate": True, "output_scores": True, "output_logits": True, **kw}
        rows = slice(0, 3) if i % 2 == 0 else slice(1, 2)  # the padded batch, or one prompt alone
        b_ids, b_mask = ids[rows], mask[rows]
        if rows.stop - rows.start == 1:
            b_ids, b_mask = b_ids[:, b_mask[0].bool()], None
        _compare(_hf(hf, b_ids, b_mask, **kw), gptfast.generate(model, b_ids, b_mask, **kw), kw)
    stats = model.kv_cache.stats()
    assert stats["free_blocks"] == stats["total_blocks"]


def test_plain_tensor_output_and_max_length(pair):
    hf, model = pair
    ids, mask = _batch(hf.config.vocab_size, [4, 4], seed=2)
    kw = dict(num_beams=3, max_length=9, pad_token_id=0, num_return_sequences=2)
    assert torch.equal(gptfast.generate(model, ids, mask, **kw), _hf(hf, ids, mask, **kw))


def test_beams_share_blocks_and_copy_only_the_last_partial_block():
    hf = make_hf_model(get_config("tiny-odd"), seed=3)
    bs = 4
    model = GPT2.from_pretrained(hf, block_size=bs)
    prompt = list(range(1, 19))  # 4 full blocks + 2 tokens
    nb, new = 5, 6
    res = beam_search(model, [prompt], SamplingParams(max_new_tokens=new), num_beams=nb,
                      num_return=1, length_penalty=1.0, early_stopping=False, fill=0)
    longest = len(prompt) + new - 1  # tokens whose K/V a beam holds at its last step
    independent = nb * -(-longest // bs)
    shared_prompt = len(prompt) // bs
    # the prompt's full blocks once; each beam at most its own tail blocks past them
    assert res.peak_blocks <= shared_prompt + nb * -(-(longest - shared_prompt * bs) // bs)
    assert res.peak_blocks < independent
    stats = model.kv_cache.stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    # the same tokens as HF, and the pool's prefix cache still serves the prompt afterwards
    want = _hf(hf, torch.tensor([prompt]), None, num_beams=nb, max_new_tokens=new,
               pad_token_id=0, eos_token_id=None)
    assert torch.equal(torch.tensor([prompt + res.sequences[0].tolist()]), want)


@pytest.mark.parametrize("graphs", ["0", "1"], ids=["eager-decode", "graph-runner"])
def test_beam_search_through_the_kernels(monkeypatch, graphs):
    """The Triton kernels (the interpreter on the CPU) under the beam search's forks."""
    monkeypatch.setenv("GPTFAST_KERNELS", "triton")
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", graphs)
    config = GPT2Config(vocab_size=211, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=210, eos_token_id=210)
    hf = make_hf_model(config, seed=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT2.from_pretrained(hf, device=device, block_size=4)
    ids, mask = _batch(config.vocab_size, [7, 5], seed=5)
    kw = dict(num_beams=3, max_new_tokens=4, pad_token_id=0, eos_token_id=None,
              num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    want = _hf(hf, ids, mask, **kw)
    got = gptfast.generate(model, ids.to(device), mask.to(device), **kw)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    torch.testing.assert_close(got.sequences_scores.cpu(), want.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=2, num_return_sequences=3),
     r"`num_return_sequences` \(3\) has to be smaller or equal to `num_beams` \(2\)"),
    (dict(num_beams=0), r"`num_beams` has to be a positive integer"),
    (dict(num_beams=2, early_stopping="sometimes"), r"`early_stopping` must be a boolean or 'never'"),
])
def test_bad_beam_arguments_raise(pair, kwargs, match):
    hf, model = pair
    with pytest.raises(ValueError, match=match):
        gptfast.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, pad_token_id=0, **kwargs)


def test_cli_num_beams_prints_the_beam_search_tokens(capsys):
    from gptfast import cli

    assert cli.main(["generate", "tiny-odd", "--random-weights", "--ids", "5,6,7", "--num-beams", "3",
                     "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed[:3] == [5, 6, 7]  # the prompt, echoed
    model = GPT2.from_config("tiny-odd", seed=0)  # the CLI's random weights
    eos = model.generation_defaults.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    want = gptfast.generate(model, torch.tensor([[5, 6, 7]]), num_beams=3, max_new_tokens=4,
                            pad_token_id=min(eos) if eos else 0)[0, 3:].tolist()
    # the CLI ends a sample at the end-of-text token and does not print it
    want = want[:next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert printed[3:] == want
    assert want != gptfast.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4,
                                    pad_token_id=0)[0, 3:].tolist()[:len(want)]


def test_beam_steps_replay_the_decode_graph(monkeypatch):
    """GPTFAST_CUDA_GRAPHS=1 on the CPU: the beams' decode steps go through the graph runner's
    static buffers (its logits graph), with the same tokens as HF."""
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    from gptfast import graphs

    hf = make_hf_model(get_config("tiny-odd"), seed=8)
    model = GPT2.from_pretrained(hf, block_size=4)
    ids, mask = _batch(hf.config.vocab_size, [6, 4], seed=9)
    runner = graphs.graph_runner(model)
    before = runner.num_replays
    kw = dict(num_beams=3, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert torch.equal(gptfast.generate(model, ids, mask, **kw), _hf(hf, ids, mask, **kw))
    assert runner.num_replays - before == 4  # every step after the prefill
    # sampling on the same runner afterwards equals the eager path
    a = gptfast.generate(model, ids, mask, do_sample=True, seed=1, max_new_tokens=4, pad_token_id=0)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    b = gptfast.generate(model, ids, mask, do_sample=True, seed=1, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9),
                                dict(top_k=0, min_p=0.05, typical_p=0.9, eos_token_id=[4, 9])],
                         ids=["defaults", "t-topk-topp", "min_p-typical-eos"])
def test_beam_sampling_draws_what_hf_draws_from_the_same_rng(kw):
    """Beam sampling takes HF's draws (torch.multinomial on the global RNG): with the same
    torch.manual_seed the same hypotheses come out."""
    hf = make_hf_model(CONFIGS["h10"], seed=12)
    model = GPT2.from_pretrained(hf, block_size=4)
    ids, mask = _batch(hf.config.vocab_size, [5, 3], seed=11)
    kw = {"num_beams": 3, "do_sample": True, "max_new_tokens": 5, "pad_token_id": 0,
          "eos_token_id": None, "num_return_sequences": 2, "return_dict_in_generate": True,
          "output_scores": True, **kw}
    torch.manual_seed(5)
    want = _hf(hf, ids, mask, **kw)
    torch.manual_seed(5)
    got = gptfast.generate(model, ids, mask, **kw)
    _compare(want, got, kw)
    # another seed draws other hypotheses; a `seed` argument reproduces without the global RNG
    torch.manual_seed(6)
    assert not torch.equal(gptfast.generate(model, ids, mask, **kw).sequences, got.sequences)
    a = gptfast.generate(model, ids, mask, seed=3, **kw).sequences
    state = torch.get_rng_state()
    assert torch.equal(gptfast.generate(model, ids, mask, seed=3, **kw).sequences, a)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("early_stopping,length_penalty", [(True, 1.0), (False, 1.0), ("never", 2.0),
                                                           (False, -0.5)])
def test_search_ends_early_like_hf(pair, early_stopping, length_penalty):
    """EOS among the likeliest tokens, so hypotheses finish in the first steps and the
    `early_stopping` rules end the search before the length limit."""
    hf, model = pair
    ids, mask = _batch(hf.config.vocab_size, [5, 4], seed=13)
    with torch.no_grad():
        first = hf(ids, attention_mask=mask).logits[:, -1]
    eos = sorted(set(first.topk(8, dim=-1).indices.flatten().tolist()) - {0})
    kw = dict(num_beams=3, max_new_tokens=8, pad_token_id=0, eos_token_id=eos,
              early_stopping=early_stopping, length_penalty=length_penalty,
              return_dict_in_generate=True, output_scores=True, num_return_sequences=2)
    want = _hf(hf, ids, mask, **kw)
    _compare(want, gptfast.generate(model, ids, mask, **kw), kw)
    if early_stopping is True:
        assert len(want.scores) < 8, "the case does not exercise early stopping"


def test_engine_beam_search_shares_the_pool_with_running_sequences():
    from gptfast import Engine

    hf = make_hf_model(get_config("tiny-odd"), seed=14)
    model = GPT2.from_pretrained(hf, block_size=4)
    engine = Engine(model)
    [sid] = engine.add([1, 2, 3], SamplingParams(max_new_tokens=6), seeds=[0])
    first = engine.step()  # the running sequence holds blocks during the search
    prompt = [5, 6, 7, 8, 9]
    res = engine.beam_search([prompt], SamplingParams(max_new_tokens=5), num_beams=3, num_return=2)
    want = _hf(hf, torch.tensor([prompt]), None, num_beams=3, max_new_tokens=5, pad_token_id=0,
               eos_token_id=None, num_return_sequences=2)
    assert torch.equal(res.sequences, want[:, len(prompt):])
    rest = [o.token for o in engine.stream()]
    alone = gptfast.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=6, pad_token_id=0,
                             eos_token_id=None)
    assert [first[0].token] + rest == alone[0, 3:].tolist()
    with pytest.raises(ValueError, match="num_return must be"):
        engine.beam_search([prompt], SamplingParams(max_new_tokens=2), num_beams=2, num_return=3)

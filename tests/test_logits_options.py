"""HF's remaining logits options on gptfast: no_repeat_ngram_size, bad_words_ids, suppress_tokens,
begin_suppress_tokens (greedy, exact against HF) and min_p, typical_p (sampled, against HF's
filtered distribution). fp32 on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import gptfast
from gptfast import GPT2, get_config, processors

from checkpoints import PARITY_CONFIGS as CONFIGS
from checkpoints import make_hf_model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf = make_hf_model(CONFIGS[request.param], seed=5)
    return hf, GPT2.from_pretrained(hf)


@pytest.fixture(scope="module")
def tiny():
    hf = make_hf_model(get_config("tiny-odd"), seed=6)
    return hf, GPT2.from_pretrained(hf)


def _prompts(vocab, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def _hf(hf, ids, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _greedy_tokens(hf, ids, n):
    return _hf(hf, ids, max_new_tokens=n, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()


def _options(hf, prompt):
    """Options that bite on this prompt: banned words and suppressed tokens taken from the
    tokens greedy search would pick, so the constrained output must differ."""
    ids = prompt[None]
    greedy = _greedy_tokens(hf, ids, 6)
    last = prompt[-1].item()
    return [
        dict(no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=1),
        dict(bad_words_ids=[[greedy[0]], [greedy[1]]]),
        dict(bad_words_ids=[[last, greedy[0]], [greedy[2], greedy[3], greedy[4]]]),  # multi-token
        dict(suppress_tokens=[greedy[1], greedy[3]]),
        dict(begin_suppress_tokens=[greedy[0]]),
        dict(no_repeat_ngram_size=3, bad_words_ids=[[greedy[2], greedy[3]]], suppress_tokens=[greedy[4]],
             begin_suppress_tokens=[greedy[0]], repetition_penalty=1.3, min_new_tokens=3,
             eos_token_id=greedy[1]),
    ]


def test_greedy_options_match_hf_single_and_batch(pair):
    hf, model = pair
    V = hf.config.vocab_size
    for prompt in _prompts(V, [7 if V % 2 else 3], seed=1):
        ids = prompt[None]
        for kw in _options(hf, prompt):
            kw = {"max_new_tokens": 8, "pad_token_id": 0, "eos_token_id": None, **kw}
            want = _hf(hf, ids, **kw)
            got = gptfast.generate(model, ids, **kw)
            assert torch.equal(got, want), f"{kw}: gptfast {got.tolist()} vs HF {want.tolist()}"
    # a batch of equal-length prompts (HF's padding would add pad n-grams to its history)
    ids = torch.stack(_prompts(V, [5, 5, 5], seed=2))
    kw = dict(max_new_tokens=8, pad_token_id=0, no_repeat_ngram_size=2,
              bad_words_ids=[[ids[0, -1].item(), 3], [4]], suppress_tokens=[7])
    assert torch.equal(gptfast.generate(model, ids, **kw), _hf(hf, ids, **kw))


def test_options_change_the_output_and_hold(tiny):
    """The constraints hold in gptfast's output (and are not vacuous: greedy breaks them)."""
    hf, model = tiny
    prompt = _prompts(hf.config.vocab_size, [4], seed=3)[0]
    ids = prompt[None]
    plain = gptfast.generate(model, ids, max_new_tokens=12, pad_token_id=0)[0].tolist()
    out = gptfast.generate(model, ids, max_new_tokens=12, pad_token_id=0, no_repeat_ngram_size=2)[0].tolist()
    bigrams = list(zip(out, out[1:]))
    assert len(bigrams) == len(set(bigrams))
    if len(set(zip(plain, plain[1:]))) == len(plain) - 1:
        pytest.skip("greedy output repeats no bigram on this prompt")
    assert out != plain


def test_scores_show_the_masks_like_hf(tiny):
    hf, model = tiny
    ids = _prompts(hf.config.vocab_size, [6], seed=4)[0][None]
    kw = dict(max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
              no_repeat_ngram_size=2, suppress_tokens=[1, 2], begin_suppress_tokens=[5])
    want, got = _hf(hf, ids, **kw), gptfast.generate(model, ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        assert torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a[~a.isinf()], b[~b.isinf()], atol=1e-4, rtol=0)


def _hf_warped_probs(hf, ids, **kw):
    """HF's own warpers (built by its generate machinery) on the first step's logits."""
    from transformers import GenerationConfig

    with torch.no_grad():
        logits = hf(ids).logits[:, -1].float()
    cfg = GenerationConfig(do_sample=True, **kw)
    procs = hf._get_logits_processor(cfg, input_ids_seq_length=ids.shape[1], device="cpu")
    return procs(ids, logits).softmax(-1)[0]


@pytest.mark.parametrize("kw", [dict(min_p=0.1, top_k=0), dict(typical_p=0.6, top_k=0),
                                dict(min_p=0.05, typical_p=0.8, temperature=0.8, top_k=30)],
                         ids=["min_p", "typical_p", "t-topk-min_p-typical"])
def test_sampled_first_token_matches_hf_filtered_distribution(tiny, kw):
    from scipy.stats import chisquare

    hf, model = tiny
    ids = _prompts(hf.config.vocab_size, [6], seed=15)[0][None]
    probs = _hf_warped_probs(hf, ids, **kw)
    n = 3000
    out = gptfast.generate(model, ids, max_new_tokens=1, do_sample=True, num_return_sequences=n,
                           seed=7, pad_token_id=0, eos_token_id=None, **kw)
    first = out[:, -1]
    support = probs > 0
    assert bool(support[first].all()), "drew a token HF's filters remove"
    assert int(support.sum()) < probs.numel() // 2, "the filter removed almost nothing"
    keep = support.nonzero().flatten()
    expected = probs[keep].double() * n
    observed = torch.bincount(first, minlength=probs.numel()).double()[keep]
    big = expected >= 5
    f_obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    f_exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if f_exp[-1] < 5:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    p = chisquare(f_obs.numpy(), f_exp.numpy() * f_obs.sum().item() / f_exp.sum().item()).pvalue
    assert p > 1e-3, f"first-token frequencies differ from HF's filtered softmax (p={p:.2e})"


def test_warpers_equal_hf_processors():
    from transformers.generation.logits_process import MinPLogitsWarper, TypicalLogitsWarper

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 97, generator=gen) * 3
    x[1, :50] = float("-inf")
    for keep in (1, 3):
        want = MinPLogitsWarper(0.2, min_tokens_to_keep=keep)(None, x.clone())
        got = processors.min_p_(x.clone(), torch.full((5,), 0.2), keep)
        assert torch.equal(got, want)
        want = TypicalLogitsWarper(0.7, min_tokens_to_keep=keep)(None, x.clone())
        got = processors.typical_(x.clone(), torch.full((5,), 0.7), keep)
        assert torch.equal(got, want)


def test_ngram_and_bad_words_bans():
    assert sorted(processors.no_repeat_ngram_bans([1, 2, 3, 1, 2, 4, 1], 2).tolist()) == [2, 2]
    assert sorted(processors.no_repeat_ngram_bans([1, 2, 3, 1, 2], 3).tolist()) == [3]
    assert processors.no_repeat_ngram_bans([1], 2).size == 0
    assert processors.bad_words_bans([5, 6, 7], ((9,), (6, 7, 8), (5, 8), (1, 2, 3, 4, 5))) == [9, 8]


def test_engine_graph_path_applies_the_options(tiny, monkeypatch):
    """The static-buffer (CUDA graph) decode step falls back to eager processing for them."""
    hf, model = tiny
    ids = _prompts(hf.config.vocab_size, [5], seed=8)[0][None]
    kw = dict(max_new_tokens=6, pad_token_id=0, no_repeat_ngram_size=2, suppress_tokens=[3])
    want = _hf(hf, ids, **kw)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    assert torch.equal(gptfast.generate(model, ids, **kw), want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, min_p=1.5), r"`min_p` has to be a float in the \[0, 1\] interval"),
    (dict(do_sample=True, min_p=-0.1), r"`min_p` has to be a float in the \[0, 1\] interval"),
    (dict(do_sample=True, typical_p=0.0), r"`typical_p` has to be a float > 0 and < 1"),
    (dict(no_repeat_ngram_size=1.5), r"`ngram_size` has to be a strictly positive integer"),
    (dict(bad_words_ids=[]), r"`bad_words_ids` has to be a non-empty list"),
    (dict(bad_words_ids=[1, 2]), r"`bad_words_ids` has to be a list of lists"),
    (dict(bad_words_ids=[[-1]]), r"has to be a list of positive integers"),
    (dict(bad_words_ids=[[10**6]]), r"The model vocabulary size is"),
    (dict(suppress_tokens=["a"]), r"`suppress_tokens` has to be a list of token ids"),
])
def test_bad_option_values_raise_hf_errors(tiny, kwargs, match):
    hf, model = tiny
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=match):
        gptfast.generate(model, ids, max_new_tokens=2, pad_token_id=0, **kwargs)
    if "min_p" in kwargs or "typical_p" in kwargs:
        with pytest.raises(ValueError, match=match):
            _hf(hf, ids, max_new_tokens=2, pad_token_id=0, **kwargs)


def test_sampling_params_check_the_new_fields():
    from gptfast import SamplingParams

    for kw in (dict(min_p=2.0), dict(typical_p=0.0), dict(no_repeat_ngram_size=-1),
               dict(bad_words_ids=[[]]), dict(suppress_tokens=[-3])):
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(max_new_tokens=4, **kw)
    p = SamplingParams(max_new_tokens=4, do_sample=True, min_p=0.1, bad_words_ids=[[1, 2]])
    assert p.bad_words_ids == ((1, 2),) and p.warps_eagerly and p.eager_processing
    assert not SamplingParams(max_new_tokens=4, min_p=0.1).warps_eagerly  # greedy ignores it


def test_checkpoint_generation_config_options_are_honoured():
    hf = make_hf_model(get_config("tiny-odd"), seed=9)
    hf.generation_config.no_repeat_ngram_size = 2
    hf.generation_config.suppress_tokens = [3, 4]
    ids = _prompts(hf.config.vocab_size, [5], seed=10)[0][None]
    kw = dict(max_new_tokens=6, pad_token_id=0)
    assert torch.equal(gptfast.generate(hf, ids, **kw), _hf(hf, ids, **kw))

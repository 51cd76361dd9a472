"""Parity with Hugging Face: logits, greedy generate, sampling semantics, every generate() argument
and every bad input. fp32 on the CPU (the eager references)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gptfast
import gptfast.beam
from gptfast import GPT2, GPT2Config, get_config

from checkpoints import make_hf_model, save_hf_checkpoint

SHAPES = {
    # vocab not a multiple of 64, 6 heads, n_positions 96
    "tiny-odd": get_config("tiny-odd"),
    # 10 heads of 8, 3 layers, odd vocab, n_positions 200
    "h10": GPT2Config(vocab_size=1031, n_positions=200, n_embd=80, n_layer=3, n_head=10,
                      bos_token_id=1030, eos_token_id=1030),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    """(hf_model, gptfast model loaded from a saved HF folder) of one shape."""
    config = SHAPES[request.param]
    hf = make_hf_model(config, seed=1)
    folder = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, GPT2.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny():
    hf = make_hf_model(get_config("tiny-odd"), seed=2)
    return hf, GPT2.from_pretrained(hf)


def _batch(vocab, lengths, seed=0):
    """A left-padded batch of random prompts with these lengths."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = 0
    return ids, mask


def _hf_generate(hf, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return hf.generate(*args, **kwargs)


def _free_after(model):
    stats = model.kv_cache.stats()
    assert stats["free_blocks"] == stats["total_blocks"], stats


# ------------------------------------------------------------------------------- logits


def test_logits_match_hf(pair):
    hf, model = pair
    ids, mask = _batch(hf.config.vocab_size, [9, 4, 1, 9], seed=3)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask)
    real = mask.bool()
    err = (got - expected).abs()[real].max().item()
    assert err < 1e-4, f"max abs logit error {err:.3e} on real positions"
    got_nomask = model(ids)
    with torch.no_grad():
        expected_nomask = hf(ids).logits
    assert (got_nomask - expected_nomask).abs().max().item() < 1e-4


def test_logits_from_live_object_equal_folder(pair):
    hf, from_folder = pair
    live = GPT2.from_pretrained(hf)
    ids, _ = _batch(hf.config.vocab_size, [7], seed=4)
    assert torch.equal(live(ids), from_folder(ids))


@pytest.mark.slow
def test_gpt2_124m_shape_logits_and_greedy():
    config = get_config("gpt2")
    hf = make_hf_model(config, seed=0)
    model = GPT2.from_pretrained(hf)
    ids, mask = _batch(config.vocab_size, [12, 5], seed=5)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
    err = (model(ids, attention_mask=mask) - expected).abs()[mask.bool()].max().item()
    assert err < 1e-4, f"max abs logit error {err:.3e}"
    ref = _hf_generate(hf, ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    got = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------- greedy


def test_greedy_batch_matches_hf_and_each_prompt_alone(pair):
    hf, model = pair
    ids, mask = _batch(hf.config.vocab_size, [11, 3, 1, 7, 11], seed=6)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
    got = gptfast.generate(model, ids, attention_mask=mask, **kw)
    assert got.shape == ref.shape
    assert torch.equal(got, ref), _first_mismatch(got, ref)
    T = ids.shape[1]
    for b in range(ids.shape[0]):
        alone = ids[b][mask[b].bool()].unsqueeze(0)
        ref_alone = _hf_generate(hf, alone, **kw)
        got_alone = gptfast.generate(model, alone, **kw)
        assert torch.equal(got_alone, ref_alone), f"row {b} alone differs from HF"
        assert torch.equal(got_alone[0, alone.shape[1]:], got[b, T:]), f"row {b}: batch != alone"
    _free_after(model)


def _first_mismatch(a, b):
    idx = (a != b).nonzero()
    return f"first mismatches at {idx[:5].tolist()}" if len(idx) else ""


def test_greedy_with_eos_pads_and_stops_early_like_hf(tiny):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [6, 2, 4], seed=7)
    # An EOS that greedy decoding produces for some rows but not others.
    probe = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0,
                             eos_token_id=None)
    eos = int(probe[0, ids.shape[1] + 3])
    for eos_arg in (eos, [eos, 5]):
        kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=1, eos_token_id=eos_arg)
        ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
        got = gptfast.generate(model, ids, attention_mask=mask, **kw)
        assert torch.equal(got, ref), _first_mismatch(got, ref) if got.shape == ref.shape else (got.shape, ref.shape)


def test_min_new_tokens_min_length_and_repetition_penalty_match_hf(tiny):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [5, 8], seed=8)
    probe = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                             eos_token_id=None)
    eos = int(probe[1, ids.shape[1]])  # the first token row 1 would produce
    for extra in (dict(min_new_tokens=3), dict(min_length=ids.shape[1] + 2),
                  dict(repetition_penalty=1.5), dict(repetition_penalty=0.7, min_new_tokens=2)):
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos, **extra)
        ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
        got = gptfast.generate(model, ids, attention_mask=mask, **kw)
        assert torch.equal(got, ref), (extra, _first_mismatch(got, ref))


def test_max_length_and_default_length(tiny):
    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [4], seed=9)
    ref = _hf_generate(hf, ids, max_length=9, pad_token_id=0, eos_token_id=None)
    got = gptfast.generate(model, ids, max_length=9, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, ref) and got.shape[1] == 9
    # No length anywhere: HF 5 generates 20 new tokens, within n_positions.
    for T in (4, 85):
        ids, _ = _batch(hf.config.vocab_size, [T], seed=9)
        ref = _hf_generate(hf, ids, pad_token_id=0, eos_token_id=None)
        with pytest.warns(UserWarning, match="max_length"):
            got = gptfast.generate(model, ids, pad_token_id=0, eos_token_id=None)
        assert got.shape == ref.shape == (1, min(T + 20, hf.config.n_positions))
        assert torch.equal(got, ref)


def test_min_new_tokens_takes_precedence_over_min_length(tiny):
    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [5], seed=23)
    eos = int(gptfast.generate(model, ids, max_new_tokens=1, pad_token_id=0)[0, -1])
    kw = dict(max_new_tokens=8, min_new_tokens=1, min_length=12, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(gptfast.generate(model, ids, **kw), _hf_generate(hf, ids, **kw))


def test_attention_mask_inferred_from_pad_like_hf(tiny):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [6, 2], seed=24)
    ids[mask == 0] = 9
    ids[mask == 1] = ids[mask == 1].clamp_min(10)
    kw = dict(max_new_tokens=4, pad_token_id=9, eos_token_id=4)
    ref = _hf_generate(hf, ids, **kw)
    got = gptfast.generate(model, ids, **kw)
    assert torch.equal(got, ref)
    assert torch.equal(got, gptfast.generate(model, ids, attention_mask=mask, **kw))


def test_hf_model_changes_are_seen(tiny):
    hf = make_hf_model(get_config("tiny-odd"), seed=25)
    ids, _ = _batch(hf.config.vocab_size, [5], seed=25)
    kw = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    before = gptfast.generate(hf, ids, **kw)
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight.mul_(-3.0)
    after = gptfast.generate(hf, ids, **kw)
    assert torch.equal(after, _hf_generate(hf, ids, **kw))
    assert not torch.equal(before, after)
    hf.generation_config.max_new_tokens = 2
    out = gptfast.generate(hf, ids, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == 7 == _hf_generate(hf, ids, pad_token_id=0, eos_token_id=None).shape[1]


def test_prefix_cache_dropped_when_weights_change():
    model = GPT2.from_config(get_config("tiny"), seed=0, block_size=4)
    ids = torch.arange(1, 30).view(1, -1)
    gptfast.generate(model, ids, max_new_tokens=3, pad_token_id=0)
    with torch.no_grad():
        model.h[0].attn.c_attn.weight.mul_(2.0)
    got = gptfast.generate(model, ids, max_new_tokens=3, pad_token_id=0)
    fresh = GPT2.from_config(get_config("tiny"), seed=0, block_size=4)
    with torch.no_grad():
        fresh.h[0].attn.c_attn.weight.mul_(2.0)
    assert torch.equal(got, gptfast.generate(fresh, ids, max_new_tokens=3, pad_token_id=0))


def test_unsupported_checkpoint_defaults_raise(tiny, tmp_path):
    hf = make_hf_model(get_config("tiny-odd"), seed=26)
    hf.generation_config.encoder_no_repeat_ngram_size = 2
    with pytest.raises(ValueError, match="encoder_no_repeat_ngram_size"):
        gptfast.generate(hf, torch.tensor([[1, 2]]), max_new_tokens=2, pad_token_id=0)
    folder = save_hf_checkpoint(hf, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="encoder_no_repeat_ngram_size"):
        gptfast.generate(GPT2.from_pretrained(folder), torch.tensor([[1, 2]]), max_new_tokens=2,
                         pad_token_id=0)


def test_user_max_length_criteria_sets_the_length(tiny):
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [5], seed=27)
    kw = dict(max_new_tokens=3, pad_token_id=0, eos_token_id=None,
              stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(12)]))
    ref = _hf_generate(hf, ids, **kw)
    got = gptfast.generate(model, ids, **kw)
    assert torch.equal(got, ref)


def test_unconditional_starts_from_bos(tiny):
    hf, model = tiny
    got = gptfast.generate(model, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    ref = _hf_generate(hf, max_new_tokens=5, pad_token_id=0, eos_token_id=None, do_sample=False)
    assert got[0, 0].item() == model.config.bos_token_id
    assert torch.equal(got, ref)


def test_hf_model_is_accepted_and_converted_once(tiny):
    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [5], seed=10)
    a = gptfast.generate(hf, ids, max_new_tokens=6, pad_token_id=0)
    b = gptfast.generate(hf, ids, max_new_tokens=6, pad_token_id=0)
    from gptfast.hf_convert import as_gptfast

    converted = as_gptfast(hf)[0]
    assert isinstance(converted, GPT2) and as_gptfast(hf)[0] is converted
    assert torch.equal(a, b)
    assert torch.equal(a, model.generate(ids, max_new_tokens=6, pad_token_id=0))


def test_right_padding_warns_and_is_handled(tiny):
    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [6], seed=11)
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0, 0]])
    with pytest.warns(UserWarning, match="right-padding"):
        got = gptfast.generate(model, padded, attention_mask=mask, max_new_tokens=5, pad_token_id=0,
                               eos_token_id=None)
    alone = gptfast.generate(model, ids, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got[0, :8], padded[0])
    assert torch.equal(got[0, 8:], alone[0, 6:])


# ------------------------------------------------------------------------------- sampling


def test_top_k_1_sampling_equals_greedy(pair):
    hf, model = pair
    ids, mask = _batch(hf.config.vocab_size, [6, 3], seed=12)
    greedy = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                              eos_token_id=None)
    sampled = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                               top_k=1, seed=123, pad_token_id=0, eos_token_id=None)
    assert torch.equal(greedy, sampled)


def test_seed_reproduces_and_leaves_global_rng_alone(tiny):
    _, model = tiny
    ids, mask = _batch(model.config.vocab_size, [4, 6], seed=13)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_p=0.95, pad_token_id=0,
              eos_token_id=None, num_return_sequences=3)
    state = torch.get_rng_state()
    a = gptfast.generate(model, ids, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state), "seeded generate touched torch's global RNG"
    b = gptfast.generate(model, ids, seed=7, **kw)
    c = gptfast.generate(model, ids, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Return sequences of one prompt draw independently.
    assert len({tuple(r.tolist()) for r in a[:3]}) > 1
    # Without a seed, torch's global RNG drives sampling, as in HF.
    torch.manual_seed(99)
    d = gptfast.generate(model, ids, **kw)
    torch.manual_seed(99)
    e = gptfast.generate(model, ids, **kw)
    assert torch.equal(d, e)


def test_num_return_sequences_layout(tiny):
    _, model = tiny
    ids, mask = _batch(model.config.vocab_size, [3, 5], seed=14)
    out = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=True, seed=0,
                           num_return_sequences=4, pad_token_id=0, eos_token_id=None)
    assert out.shape == (8, ids.shape[1] + 4)
    for r in range(8):
        assert torch.equal(out[r, :ids.shape[1]], ids[r // 4])


def _hf_filtered_probs(hf, ids, temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        scores = hf(ids).logits[:, -1].float()
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.8)],
                         ids=["topk50", "t0.7-topp0.9", "t1.3-topk20-topp0.8"])
def test_first_token_distribution_matches_hf_filtered_softmax(tiny, temperature, top_k, top_p):
    from scipy.stats import chisquare

    hf, model = tiny
    ids, _ = _batch(model.config.vocab_size, [6], seed=15)
    probs = _hf_filtered_probs(hf, ids, temperature, top_k, top_p)
    n = 4000
    out = gptfast.generate(model, ids, max_new_tokens=1, do_sample=True, temperature=temperature,
                           top_k=top_k, top_p=top_p, num_return_sequences=n, seed=11,
                           pad_token_id=0, eos_token_id=None)
    first = out[:, -1]
    support = probs > 0
    assert bool(support[first].all()), "drew a token HF's filters remove"
    counts = torch.bincount(first, minlength=probs.numel()).double()
    keep = support.nonzero().flatten()
    expected = probs[keep].double() * n
    # Pool rare tokens so every chi-square cell expects at least 5 draws.
    order = expected.argsort(descending=True)
    exp_sorted, obs_sorted = expected[order], counts[keep][order]
    big = exp_sorted >= 5
    f_obs = torch.cat([obs_sorted[big], obs_sorted[~big].sum().view(1)])
    f_exp = torch.cat([exp_sorted[big], exp_sorted[~big].sum().view(1)])
    if f_exp[-1] < 5:
        f_obs[-2] += f_obs[-1]
        f_exp[-2] += f_exp[-1]
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    p = chisquare(f_obs.numpy(), f_exp.numpy() * f_obs.sum().item() / f_exp.sum().item()).pvalue
    assert p > 1e-3, f"first-token frequencies differ from HF's filtered softmax (p={p:.2e})"
    _free_after(model)


# ------------------------------------------------------------------------------- outputs


def test_return_dict_scores_and_logits_match_hf(tiny):
    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [5, 3], seed=16)
    # (no repetition penalty on a padded batch here: COMPAT(transformers 5.17) HF also penalises the pad id)
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
              output_logits=True, pad_token_id=0, eos_token_id=None, min_new_tokens=2)
    ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
    got = gptfast.generate(model, ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    assert got["sequences"] is got.sequences
    assert "scores" in got and list(got) == ["sequences", "scores", "logits"] and len(got) == 3
    assert len(got.scores) == len(ref.scores) == 6
    for a, b in zip(got.scores, ref.scores):
        assert (a - b).abs().max().item() < 1e-4
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max().item() < 1e-4
    # Sampling: the first step's scores are HF's warped scores (-inf where filtered).
    kw = dict(max_new_tokens=1, do_sample=True, top_k=7, top_p=0.8, temperature=0.9,
              return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    got = gptfast.generate(model, ids, attention_mask=mask, seed=0, **kw)
    ref = _hf_generate(hf, ids, attention_mask=mask, **kw)
    a, b = got.scores[0], ref.scores[0]
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    assert (a[~torch.isinf(a)] - b[~torch.isinf(b)]).abs().max().item() < 1e-4


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def test_streamer_protocol_matches_hf(tiny):
    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [5], seed=17)
    kw = dict(max_new_tokens=7, pad_token_id=0, eos_token_id=None, do_sample=False)
    a, b = _Recorder(), _Recorder()
    _hf_generate(hf, ids, streamer=a, **kw)
    gptfast.generate(model, ids, streamer=b, **kw)
    assert [c[0] for c in a.calls] == [c[0] for c in b.calls]
    for (_, x), (_, y) in zip(a.calls, b.calls):
        if x is not None:
            assert torch.equal(x.view(-1), y.view(-1))


def test_streamer_gets_the_expanded_prompt_like_hf(tiny):
    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [4, 4], seed=28)
    kw = dict(max_new_tokens=2, do_sample=True, num_return_sequences=3, pad_token_id=0)
    a, b = _Recorder(), _Recorder()
    _hf_generate(hf, ids, streamer=a, **kw)
    gptfast.generate(model, ids, streamer=b, seed=0, **kw)
    assert [tuple(x.shape) if x is not None else None for _, x in a.calls] == \
        [tuple(x.shape) if x is not None else None for _, x in b.calls]


def test_stopping_criteria_match_hf(tiny):
    from transformers import StoppingCriteria, StoppingCriteriaList

    hf, model = tiny
    ids, mask = _batch(hf.config.vocab_size, [4, 6, 2], seed=18)
    probe = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                             eos_token_id=None)
    stop_token = int(probe[1, ids.shape[1] + 2])

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    # With an EOS token set, HF pads rows a criterion stopped; without one, they run on until
    # every row is stopped. Both behaviours are matched.
    for eos in (None, 3):
        kw = dict(max_new_tokens=10, pad_token_id=0, eos_token_id=eos, do_sample=False)
        ref = _hf_generate(hf, ids, attention_mask=mask,
                           stopping_criteria=StoppingCriteriaList([StopOn()]), **kw)
        got = gptfast.generate(model, ids, attention_mask=mask,
                               stopping_criteria=StoppingCriteriaList([StopOn()]), **kw)
        assert torch.equal(got, ref), (eos, got, ref)
    _free_after(model)


def test_generation_config_and_checkpoint_defaults(tiny, tmp_path):
    from transformers import GenerationConfig

    hf, model = tiny
    ids, _ = _batch(hf.config.vocab_size, [4], seed=19)
    cfg = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = _hf_generate(hf, ids, generation_config=cfg)
    got = gptfast.generate(model, ids, generation_config=cfg)
    assert torch.equal(got, ref)
    # Explicit kwargs win over the generation config.
    assert gptfast.generate(model, ids, generation_config=cfg, max_new_tokens=2).shape[1] == 6
    # A checkpoint's generation_config.json supplies defaults, as in HF.
    hf.generation_config.max_new_tokens = 3
    hf.generation_config.pad_token_id = 0
    folder = save_hf_checkpoint(hf, tmp_path / "ckpt")
    hf.generation_config.max_new_tokens = None
    loaded = GPT2.from_pretrained(folder)
    assert loaded.generation_defaults["max_new_tokens"] == 3
    assert gptfast.generate(loaded, ids).shape[1] == 7
    # An explicit generation_config keeps the checkpoint's values for fields it leaves unset.
    out = gptfast.generate(loaded, ids, generation_config=GenerationConfig(do_sample=True, top_k=1))
    assert out.shape[1] == 7


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_beams"),
    (dict(num_beam_groups=2), "num_beam_groups"),
    (dict(epsilon_cutoff=0.1, do_sample=True), "epsilon_cutoff"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(max_new_tokens=200), "n_positions"),
    (dict(max_length=3, max_new_tokens=None), "max_length"),
    (dict(eos_token_id=5000), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(seed=1.5), "seed"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_arguments_raise_clear_errors(tiny, kwargs, match):
    _, model = tiny
    ids, _ = _batch(model.config.vocab_size, [4], seed=20)
    kwargs = dict(kwargs)  # the parameter's dict is shared by every run of this test
    kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        gptfast.generate(model, ids, pad_token_id=kwargs.pop("pad_token_id", 0), **kwargs)
    _free_after(model)


def test_unknown_argument_is_a_type_error(tiny):
    _, model = tiny
    with pytest.raises(TypeError, match="max_new_tokns"):
        gptfast.generate(model, torch.tensor([[1, 2]]), max_new_tokns=3)


@pytest.mark.parametrize("case", ["id-too-large", "negative-id", "float-ids", "1d", "empty-batch",
                                  "empty-prompt", "mask-shape", "mask-values", "mask-all-zero",
                                  "too-long"])
def test_bad_prompts_raise_clear_errors(tiny, case):
    _, model = tiny
    V, P = model.config.vocab_size, model.config.n_positions
    ids, mask = torch.tensor([[1, 2, 3]]), None
    match = None
    if case == "id-too-large":
        ids, match = torch.tensor([[1, V]]), "outside the vocabulary"
    elif case == "negative-id":
        ids, match = torch.tensor([[-1, 2]]), "outside the vocabulary"
    elif case == "float-ids":
        ids, match = torch.tensor([[1.0, 2.0]]), "integer"
    elif case == "1d":
        ids, match = torch.tensor([1, 2]), "shape"
    elif case == "empty-batch":
        ids, match = torch.zeros(0, 3, dtype=torch.long), "empty"
    elif case == "empty-prompt":
        ids, match = torch.zeros(1, 0, dtype=torch.long), "empty"
    elif case == "mask-shape":
        mask, match = torch.ones(1, 4, dtype=torch.long), "attention_mask"
    elif case == "mask-values":
        mask, match = torch.tensor([[0, 2, 1]]), "attention_mask"
    elif case == "mask-all-zero":
        mask, match = torch.zeros(1, 3, dtype=torch.long), "no real token"
    elif case == "too-long":
        ids, match = torch.ones(1, P + 1, dtype=torch.long), "n_positions"
    with pytest.raises(ValueError, match=match):
        gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_nan_logits_name_row_and_step():
    config = get_config("tiny")
    model = GPT2.from_config(config, seed=0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        model.wte.weight[7] = float("nan")  # tied head: token 7's logit is NaN everywhere
    with pytest.raises(ValueError, match=r"row 0 .*step 0 .*NaN"):
        gptfast.generate(model, ids, max_new_tokens=3, do_sample=True, seed=0, pad_token_id=0)
    _free_after(model)
    with torch.no_grad():
        model.wte.weight[7] = float("inf")
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        gptfast.generate(model, ids, max_new_tokens=3, do_sample=True, seed=0, pad_token_id=0)
    _free_after(model)


def test_all_masked_row_is_an_error_and_minus_inf_is_never_drawn(tiny):
    _, model = tiny
    V = model.config.vocab_size
    ids = torch.tensor([[1, 2, 3]])
    # Every token is an EOS and EOS is masked for the first token: nothing can be drawn.
    with pytest.raises(ValueError, match="only -inf"):
        gptfast.generate(model, ids, max_new_tokens=2, min_new_tokens=1, do_sample=True, seed=0,
                         eos_token_id=list(range(V)), pad_token_id=0)
    _free_after(model)
    # All but one token masked: that token is always drawn.
    keep = 17
    out = gptfast.generate(model, ids, max_new_tokens=1, min_new_tokens=1, do_sample=True, seed=0,
                           eos_token_id=[t for t in range(V) if t != keep], pad_token_id=0,
                           num_return_sequences=50)
    assert bool((out[:, -1] == keep).all())


def test_interrupted_generate_frees_every_block(tiny):
    _, model = tiny
    ids, mask = _batch(model.config.vocab_size, [5, 9], seed=21)

    class Boom:
        def __init__(self):
            self.n = 0

        def put(self, value):
            self.n += 1
            if self.n == 4:
                raise KeyboardInterrupt

        def end(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=10, streamer=Boom(),
                         pad_token_id=0)
    _free_after(model)
    # The model still generates correctly afterwards.
    a = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    model._kv_cache = None
    b = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)],
                         ids=["bf16", "fp16"])
def test_low_precision_logits_within_policy(tiny, dtype, tol):
    _, model32 = tiny
    model = GPT2.from_pretrained(tiny[0], dtype=dtype)
    ids, mask = _batch(model.config.vocab_size, [8, 5], seed=22)
    ref = model32(ids, attention_mask=mask)
    got = model(ids, attention_mask=mask).float()
    real = mask.bool()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1))[real].max().item()
    assert rel < tol, f"{dtype}: relative logit error {rel:.3e} > {tol}"
    out = gptfast.generate(model, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    ref_out = gptfast.generate(model32, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    # Greedy tokens agree over a short horizon on most rows (the policy in the README).
    agree = (out[:, ids.shape[1]] == ref_out[:, ids.shape[1]]).float().mean().item()
    assert agree >= 0.5
    assert math.isfinite(got.abs().max().item())


def test_bf16_cpu_linear_follows_weight_changes():
    from gptfast.model import Linear

    lin = Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear
    assert (lin(x).float() - ref(x, lin.weight, lin.bias).float()).abs().max() < 1e-2
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: the prepacked copy must be rebuilt
    assert (lin(x).float() - ref(x, lin.weight, lin.bias).float()).abs().max() < 2e-2


def test_patch_hf_generate_runs_hf_calls_on_gptfast(monkeypatch):
    import gptfast.generation as generation

    hf = make_hf_model(get_config("tiny-odd"), seed=29)
    ids, mask = _batch(hf.config.vocab_size, [5, 3], seed=29)
    kw = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    ref = _hf_generate(hf, ids, **kw)
    assert gptfast.patch_hf_generate(hf) is hf
    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = hf.generate(ids, **kw)
    got_kw = hf.generate(input_ids=ids, **kw)
    assert calls == [1, 1], "the patched method did not run on gptfast"
    assert torch.equal(got, ref) and torch.equal(got_kw, ref)
    gptfast.unpatch_hf_generate(hf)
    assert "generate" not in hf.__dict__
    assert torch.equal(_hf_generate(hf, ids, **kw), ref)


def test_engine_options_reach_the_engine_over_the_environment(monkeypatch):
    import gptfast.generation as generation

    model = GPT2.from_config(get_config("tiny-odd"), seed=3)
    ids = torch.tensor([[3, 1, 4]])
    kw = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    model._graph_runner = None
    want = gptfast.generate(model, ids, **kw)
    assert model._graph_runner is None
    assert torch.equal(gptfast.generate(model, ids, cuda_graphs=True, **kw), want)
    assert model._graph_runner[1].num_replays == 3  # every decode step ran on the runner
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    model._graph_runner = None
    assert torch.equal(gptfast.generate(model, ids, cuda_graphs=False, **kw), want)
    assert model._graph_runner is None

    class Built(Exception):
        pass

    seen = []

    def spy(model, **options):
        seen.append(options)
        raise Built

    monkeypatch.setattr(generation, "Engine", spy)
    with pytest.raises(Built):
        gptfast.generate(model, ids, kernels="reference", **kw)
    assert seen[-1]["kernels"] == "reference" and seen[-1]["cuda_graphs"] is None

    def beam_spy(model, prompts, params, **options):
        seen.append(options)
        raise Built

    monkeypatch.setattr(gptfast.beam, "beam_search", beam_spy)
    with pytest.raises(Built):
        gptfast.generate(model, ids, num_beams=2, kernels="reference", cuda_graphs=False, **kw)
    assert seen[-1]["kernels"] == "reference" and seen[-1]["cuda_graphs"] is False


def test_forget_conversion_after_a_data_write():
    hf = make_hf_model(get_config("tiny-odd"), seed=30)
    ids, _ = _batch(hf.config.vocab_size, [5], seed=30)
    kw = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    gptfast.generate(hf, ids, **kw)
    hf.transformer.h[0].mlp.c_fc.weight.data.mul_(-3.0)  # invisible to version counters
    gptfast.hf_convert.forget_conversion(hf)
    assert torch.equal(gptfast.generate(hf, ids, **kw), _hf_generate(hf, ids, **kw))


def test_hf_model_conversion_keeps_its_prefix_cache():
    hf = make_hf_model(get_config("tiny-odd"), seed=31)
    ids = torch.arange(1, 40).view(1, -1)
    gptfast.generate(hf, ids, max_new_tokens=2, pad_token_id=0)
    model = gptfast.hf_convert.as_gptfast(hf)[0]
    assert not model.wte.weight.is_inference()
    before = model.kv_cache.stats()["prefix_hit_tokens"]
    gptfast.generate(hf, ids, max_new_tokens=2, pad_token_id=0)
    assert model.kv_cache.stats()["prefix_hit_tokens"] > before


def test_sampling_params_are_checked():
    from gptfast import SamplingParams

    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(max_new_tokens=2, top_k=-1),
                dict(max_new_tokens=2, top_p=0.0), dict(max_new_tokens=2, repetition_penalty=0.0),
                dict(max_new_tokens=2, do_sample=True, temperature=0.0),
                dict(max_new_tokens=2, eos_token_ids=(1, -2))):
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(**bad)
    assert SamplingParams(max_new_tokens=2, eos_token_ids=[3, 4]).eos_token_ids == (3, 4)


def test_numpy_integers_are_accepted():
    import numpy as np

    model = GPT2.from_config(get_config("tiny"), seed=0)
    out = gptfast.generate(model, torch.tensor([[1, 2]]), max_new_tokens=np.int64(3),
                           eos_token_id=np.int64(5), pad_token_id=np.int32(0), seed=np.int64(1),
                           do_sample=True)
    assert out.shape == (1, 5)

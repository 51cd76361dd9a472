"""`generate()`: Hugging Face's `GPT2LMHeadModel.generate()` arguments and outputs on gptfast.

This file is the only place that knows HF's argument names. It checks every argument, turns a
left-padded `(input_ids, attention_mask)` batch into ragged prompts (each row's real tokens, with
positions counted from its first real token, exactly as HF's generate counts them), runs them
through the engine, and reassembles HF-shaped output: the input row, then the new tokens, padded
with `pad_token_id` after a row ends.

Differences from HF, by design:
- Each row is computed alone (no padding inside the model), so a row of a padded batch gets the
  tokens it would get alone. The repetition penalty sees only a row's real tokens (as in
  transformers 5.24; some versions also penalise the pad id in padded rows).
- `output_scores` / `output_logits` rows of sequences that already finished hold -inf (HF keeps
  running finished rows on pad tokens; those values carry no information).
- Sampling draws from Philox streams keyed by a per-row seed and the token index, not from
  torch's global generator: without `seed`, the per-row seeds are drawn from torch's global RNG
  (so `torch.manual_seed` reproduces a run); with `seed`, torch's global RNG is left untouched.
"""

from __future__ import annotations

import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Engine, NonFiniteLogitsError, SamplingParams, weights_fingerprint

# HF generation arguments gptfast implements, with HF's defaults (GenerationConfig).
_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_return_sequences": 1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
    "use_cache": True,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
}

# HF arguments that select behaviour gptfast does not have: an error names them. Each entry is
# the value at which the argument is inert (the default), so passing that value is accepted.
_UNSUPPORTED: dict[str, Any] = {
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "encoder_no_repeat_ngram_size": 0,
    "force_words_ids": None,
    "constraints": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "diversity_penalty": 0.0,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "low_memory": None,
    "prompt_lookup_num_tokens": None,
    "assistant_model": None,
    "watermarking_config": None,
    "dola_layers": None,
    "stop_strings": None,
    "logits_processor": None,
    "prefix_allowed_tokens_fn": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "max_time": None,
    "encoder_repetition_penalty": 1.0,
    "negative_prompt_ids": None,
    "past_key_values": None,
    "inputs_embeds": None,
    "position_ids": None,
    "token_healing": False,
}

# Fields of a GenerationConfig that only describe it and never change what is generated.
_IGNORED = {
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
    "decoder_start_token_id", "is_assistant", "cache_config", "compile_config",
    "return_legacy_cache", "disable_compile", "trust_remote_code", "generation_kwargs",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "output_router_logits", "max_matching_ngram_size",
    "pad_token_tensor", "eos_token_tensor", "bos_token_tensor", "decoder_start_token_tensor",
    "_pad_token_tensor", "_eos_token_tensor", "_bos_token_tensor", "_decoder_start_token_tensor",
    "use_model_defaults", "return_dict", "attn_implementation", "prefill_chunk_size",
    "output_past_key_values", "cache_implementation",
}


@dataclass
class GenerateOutput:
    """`return_dict_in_generate=True` output, shaped like HF's `GenerateDecoderOnlyOutput`.

    sequences : LongTensor (B * num_return_sequences, T + new)
    scores : tuple of (B * num_return_sequences, V) fp32 tensors, one per step, or None
        The processed scores each token was chosen from (after the repetition penalty,
        min-length masking and, when sampling, temperature / top-k / top-p).
    logits : tuple like `scores` with the raw logits, or None
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: None = None

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self):
        return [k for k in ("sequences", "scores", "logits") if getattr(self, k) is not None]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_tuple(self):
        return tuple(getattr(self, k) for k in self.keys())


@dataclass
class GenerateBeamOutput(GenerateOutput):
    """Beam search's `return_dict_in_generate=True` output, shaped like HF's
    `GenerateBeamDecoderOnlyOutput`.

    sequences : LongTensor (B * num_return_sequences, T + new)
    sequences_scores : fp32 (B * num_return_sequences,) or None (without output_scores)
        Each returned hypothesis' sum of log-probs over its generated length ** length_penalty.
    scores : tuple of (B * num_beams, V) fp32 tensors, one per step, or None
        The processed log-probs of every running beam at each step.
    logits : tuple like `scores` with the raw logits, or None
    beam_indices : int32 tensor (B * num_return_sequences, new)
        The beam row (of B * num_beams) each generated token came from, -1 past the hypothesis.
    """

    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None

    def keys(self):
        return [k for k in ("sequences", "sequences_scores", "scores", "logits", "beam_indices")
                if getattr(self, k) is not None]


# transformers models converted once, keyed by the HF object, with the fingerprint of the
# weights they were converted from. The lock makes threads' first calls share one conversion.
_CONVERTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CONVERTING = threading.Lock()


def _as_gptfast(model):
    """The gptfast model to run, and the HF generation defaults to use (None for a gptfast model)."""
    from .model import GPT2

    if isinstance(model, GPT2):
        return model, None
    cls = type(model)
    if cls.__module__.startswith("transformers") and hasattr(model, "config"):
        if getattr(model.config, "model_type", None) != "gpt2":
            raise ValueError(f"gptfast runs GPT-2 models only; got a transformers "
                             f"{cls.__name__} with model_type={model.config.model_type!r}")
        if not hasattr(model, "lm_head"):
            raise TypeError(f"a transformers {cls.__name__} has no language-model head; pass a "
                            f"GPT2LMHeadModel")
        with _CONVERTING:
            fingerprint = weights_fingerprint(model)
            entry = _CONVERTED.get(model)
            if entry is None or fingerprint is None or entry[1] != fingerprint:
                p = next(model.parameters())
                entry = (GPT2.from_pretrained(model, dtype=p.dtype, device=p.device), fingerprint)
                _CONVERTED[model] = entry
        # The HF object's generation_config is read on every call, as HF does.
        defaults = dict(entry[0].generation_defaults)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_diff_dict"):
            defaults.update({k: v for k, v in gen.to_diff_dict().items() if not k.startswith("_")})
        return entry[0], defaults
    raise TypeError(f"model must be a gptfast.GPT2 or a transformers GPT2LMHeadModel, "
                    f"got {cls.__module__}.{cls.__name__}")


def forget_conversion(hf_model) -> None:
    """Drop the cached gptfast conversion of `hf_model`: the next call converts it afresh. Needed
    only after writes that PyTorch's version counters do not see (through `.data`)."""
    _CONVERTED.pop(hf_model, None)


def _apply_config(args: dict, cfg: dict, where: str) -> None:
    """Merge generation-config fields into `args`; unsupported settings are errors, never ignored."""
    for key, value in cfg.items():
        if key in _DEFAULTS:
            args[key] = value
        elif key in _UNSUPPORTED:
            if value is not None and value != _UNSUPPORTED[key]:
                raise ValueError(f"{where}.{key}={value!r} is not supported by gptfast (it "
                                 f"implements greedy search, sampling and beam search)")
        elif key not in _IGNORED and not key.startswith("_") and value is not None:
            raise ValueError(f"{where}.{key}={value!r} is not supported by gptfast")


def _resolve_arguments(defaults: dict, generation_config, kwargs: dict) -> tuple[dict, set]:
    """HF's precedence: explicit kwargs > `generation_config` > the checkpoint's defaults.

    Returns the arguments and the names set anywhere (to tell HF's defaults from choices).
    """
    args = dict(_DEFAULTS)
    _apply_config(args, defaults, "the checkpoint's generation config")
    explicit = {k for k in defaults if k in _DEFAULTS}
    if generation_config is not None:
        # As in HF, fields left at their defaults keep the checkpoint's values.
        if hasattr(generation_config, "to_diff_dict"):
            cfg = generation_config.to_diff_dict()
        elif isinstance(generation_config, dict):
            cfg = dict(generation_config)
        else:
            raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, "
                            f"got {type(generation_config).__name__}")
        _apply_config(args, cfg, "generation_config")
        explicit |= {k for k in cfg if k in _DEFAULTS}
    for key, value in kwargs.items():
        if key in _DEFAULTS:
            args[key] = value
            explicit.add(key)
        elif key in _UNSUPPORTED:
            if value is not None and value != _UNSUPPORTED[key]:
                raise ValueError(f"generate() argument `{key}` is not supported by gptfast (it "
                                 f"implements greedy search, sampling and beam search); got "
                                 f"{key}={value!r}")
        else:
            raise TypeError(f"generate() got an unexpected keyword argument {key!r}")
    return args, explicit


def _eos_list(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    if isinstance(eos, numbers.Integral):
        eos = [eos]
    eos = list(eos)
    if not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in eos):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    return tuple(int(e) for e in eos)


def _integer(name, value, ok, allowed) -> int:
    """`value` as an int (numpy and torch integers accepted) if `ok`, else HF-style ValueError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise ValueError(f"`{name}` has to be {allowed}, but is {value!r}")
    return int(value)


def _infer_attention_mask(input_ids, pad, eos):
    """HF's rule when no mask is given: pad tokens are padding if the pad id occurs in the input
    and is not an EOS id; otherwise every token is real."""
    if pad is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return None
    if pad in eos or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config=None, streamer=None, stopping_criteria=None, seed: int | None = None,
             **kwargs):
    """Generate continuations like HF's `GPT2LMHeadModel.generate()` (greedy search, sampling or
    beam search).

    Parameters
    ----------
    model : gptfast.GPT2 or transformers.GPT2LMHeadModel
        An HF model is converted once (same device and dtype) and the conversion cached.
    input_ids : LongTensor (B, T) or None
        Prompts, left-padded for a batch. None: unconditional samples from `bos_token_id`
        (`<|endoftext|>`, 50256, for GPT-2).
    attention_mask : (B, T) 0/1 tensor or None
        0 marks padding. None: inferred as HF does: tokens equal to `pad_token_id` are padding
        when it is set, occurs in `input_ids` and is not an EOS id; otherwise every token is real.
    generation_config : transformers.GenerationConfig or dict, optional
        Defaults for the arguments below; explicit keyword arguments win.
    streamer : object with `put(tokens)` / `end()`, optional
        Gets the prompt first, then each step's new tokens (LongTensor (B * n,)), like HF.
    stopping_criteria : callable or list of callables, optional
        Each is called as `criterion(sequences, scores)` after every step and returns a bool or a
        BoolTensor (B * n,) marking rows that are done (HF's StoppingCriteria protocol).
    seed : int, optional
        Draw from Philox streams keyed by (seed, row); the same call with the same seed
        reproduces its output on the same device; torch's global RNG is not touched.
    **kwargs
        `max_new_tokens`, `max_length` (default 20, prompt included), `min_new_tokens`,
        `min_length`, `do_sample`, `temperature`, `top_k` (default 50 when sampling), `top_p`,
        `repetition_penalty`, `num_return_sequences`, `eos_token_id` (int or list),
        `pad_token_id`, `bos_token_id`, `return_dict_in_generate`, `output_scores`,
        `output_logits`, `use_cache`, `no_repeat_ngram_size`, `bad_words_ids`,
        `suppress_tokens`, `begin_suppress_tokens`, `min_p`, `typical_p`, and beam search:
        `num_beams`, `length_penalty`, `early_stopping`. Other HF arguments raise a ValueError
        naming them.

    Returns
    -------
    LongTensor (B * num_return_sequences, T + new), each prompt's return sequences adjacent and
    rows padded with `pad_token_id` after they end; or a `GenerateOutput` (a `GenerateBeamOutput`
    for beam search) when `return_dict_in_generate=True`.

    Examples
    --------
    >>> out = gptfast.generate(model, input_ids, attention_mask, max_new_tokens=20)
    >>> out = gptfast.generate(model, input_ids, do_sample=True, top_p=0.9, seed=0)
    """
    model, hf_defaults = _as_gptfast(model)
    config = model.config
    defaults = model.generation_defaults if hf_defaults is None else hf_defaults
    args, explicit = _resolve_arguments(defaults, generation_config, kwargs)

    # ---------------------------------------------------------------- arguments
    eos = _eos_list(args["eos_token_id"])
    for e in eos:
        if not 0 <= e < config.vocab_size:
            raise ValueError(f"`eos_token_id` is {e}, outside the vocabulary [0, {config.vocab_size})")
    pad = args["pad_token_id"]
    if isinstance(pad, torch.Tensor):
        pad = int(pad.item())
    if pad is None and eos:
        pad = eos[0]
        warnings.warn(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.",
                      UserWarning, stacklevel=3)
    if pad is not None:
        pad = _integer("pad_token_id", pad, lambda v: 0 <= v < config.vocab_size,
                       f"a token id in [0, {config.vocab_size})")
    do_sample = args["do_sample"]
    if do_sample in (0, 1) and not isinstance(do_sample, float):
        do_sample = bool(do_sample)
    else:
        raise ValueError(f"`do_sample` has to be a bool, but is {do_sample!r}")
    n_return = _integer("num_return_sequences", args["num_return_sequences"], lambda v: v >= 1,
                        "a positive integer")
    num_beams = _integer("num_beams", 1 if args["num_beams"] is None else args["num_beams"],
                         lambda v: v >= 1, "a positive integer")
    if num_beams > 1 and n_return > num_beams:
        raise ValueError(f"`num_return_sequences` ({n_return}) has to be smaller or equal to "
                         f"`num_beams` ({num_beams}).")
    early_stopping = args["early_stopping"]
    if early_stopping not in (None, True, False, "never"):
        raise ValueError(f"`early_stopping` must be a boolean or 'never', but is {early_stopping}.")
    length_penalty = 1.0 if args["length_penalty"] is None else args["length_penalty"]
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real):
        raise ValueError(f"`length_penalty` has to be a float, but is {length_penalty!r}")
    if n_return > 1 and not do_sample and num_beams == 1:
        raise ValueError("Greedy methods without beam search do not support `num_return_sequences` "
                         f"different than 1 (got {n_return}).")
    temperature, top_k, top_p = args["temperature"], args["top_k"], args["top_p"]
    if do_sample:
        temperature = 1.0 if temperature is None else temperature
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float, "
                             "otherwise your next token scores will be invalid. If you're looking "
                             "for greedy decoding strategies, set `do_sample=False`.")
        top_k = _integer("top_k", 0 if top_k is None else top_k, lambda v: v >= 0,
                         "a non-negative integer (0 switches top-k off)")
        top_p = 1.0 if top_p is None else top_p
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"`top_p` has to be a float > 0 and <= 1, but is {top_p}")
    penalty = 1.0 if args["repetition_penalty"] is None else args["repetition_penalty"]
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not penalty > 0:
        raise ValueError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty}")
    if seed is not None:
        seed = _integer("seed", seed, lambda v: True, "an int")
    filters = _filter_arguments(args, config.vocab_size, do_sample, eos)

    # ---------------------------------------------------------------- prompts
    if input_ids is None:
        bos = args["bos_token_id"]
        if bos is None:
            raise ValueError("`input_ids` is None and the model has no `bos_token_id` to start "
                             "unconditional generation from; pass input_ids or bos_token_id")
        input_ids = torch.tensor([[bos]], dtype=torch.long)
        if attention_mask is not None:
            raise ValueError("attention_mask was given without input_ids")
    mask_source = "attention_mask"
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, pad, eos)
        mask_source = f"the attention mask inferred from pad_token_id={pad}"
    prompts, attention_mask = _ragged_prompts(input_ids, attention_mask, config, mask_source)
    B, T = input_ids.shape
    criteria = _criteria_list(stopping_criteria)
    # A user's MaxLengthCriteria replaces the length limit, as in HF.
    for c in [c for c in criteria if type(c).__name__ == "MaxLengthCriteria"]:
        args["max_length"], args["max_new_tokens"] = c.max_length, None
        explicit.add("max_length")
        criteria.remove(c)
    if args["max_new_tokens"] is not None:
        max_new = _integer("max_new_tokens", args["max_new_tokens"], lambda v: v >= 1,
                           "a positive integer")
    else:
        max_length = _integer("max_length", args["max_length"], lambda v: v >= 1,
                              "a positive integer")
        if "max_length" not in explicit:
            # HF 5: by default always 20 new tokens, within the model's positions.
            warnings.warn(f"Using the model-agnostic default `max_length` (={max_length}) to "
                          "control the generation length. We recommend setting `max_new_tokens` "
                          "to control the maximum length of the generation.", UserWarning,
                          stacklevel=3)
            max_length = min(max_length + T, config.n_positions)
        if T >= max_length:
            raise ValueError(f"Input length of input_ids is {T}, but `max_length` is set to "
                             f"{max_length}. This can lead to unexpected behavior. You should "
                             "consider increasing `max_length` or, better yet, setting "
                             "`max_new_tokens`.")
        max_new = max_length - T
    longest = max(len(p) for p in prompts)
    if longest + max_new > config.n_positions:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new} needs "
                         f"{longest + max_new} positions, but the model has n_positions="
                         f"{config.n_positions}; shorten the prompt or lower max_new_tokens")
    if args["min_new_tokens"] is not None:  # HF: min_new_tokens takes precedence over min_length
        min_new = _integer("min_new_tokens", args["min_new_tokens"], lambda v: v >= 0,
                           "a non-negative integer")
    else:
        min_new = max(_integer("min_length", args["min_length"] or 0, lambda v: v >= 0,
                               "a non-negative integer") - T, 0)

    params = SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        do_sample=do_sample,
        temperature=float(temperature) if do_sample else 1.0,
        top_k=int(top_k or 0) if do_sample else 0,
        top_p=float(top_p if top_p is not None else 1.0) if do_sample else 1.0,
        repetition_penalty=float(penalty if penalty is not None else 1.0),
        eos_token_ids=eos,
        **filters,
    )
    if num_beams > 1:
        return _beam_generate(model, input_ids, prompts, params, args, num_beams, n_return,
                              float(length_penalty), early_stopping, pad, eos, streamer, criteria,
                              seed)
    rows = B * n_return
    if seed is None:
        # Follow torch's global RNG like HF: a manual_seed before the call reproduces it.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item()) if do_sample else 0
    from .ops.sampling import row_seeds

    seeds = row_seeds(seed, rows, "cpu").tolist()

    want_scores = bool(args["output_scores"]) and bool(args["return_dict_in_generate"])
    want_logits = bool(args["output_logits"]) and bool(args["return_dict_in_generate"])
    engine = Engine(model, keep_scores=want_scores or want_logits or bool(criteria))
    expanded = input_ids.repeat_interleave(n_return, dim=0).to(torch.long).cpu()
    if streamer is not None:
        streamer.put(expanded)
    run = _Run(engine, expanded, pad, streamer, criteria, want_scores, want_logits,
               config.vocab_size, input_ids.device)
    try:
        seq_rows: dict[int, int] = {}
        for b, prompt in enumerate(prompts):
            ids = engine.add(prompt, params, seeds[b * n_return:(b + 1) * n_return])
            for j, sid in enumerate(ids):
                seq_rows[sid] = b * n_return + j
        run.seq_rows = seq_rows
        run.pad_stopped_rows = bool(eos)
        run.loop()
    except NonFiniteLogitsError as e:
        raise ValueError(f"row {seq_rows.get(e.seq_id, '?')} of the output (batch index "
                         f"{seq_rows.get(e.seq_id, 0) // n_return}): the logits at generation "
                         f"step {e.index} hold "
                         f"{'NaN or +inf' if e.status == 1 else 'only -inf (every token masked)'}"
                         f"; no token can be sampled from them") from None
    finally:
        engine.abort()
        if streamer is not None:
            streamer.end()

    new = run.new_tokens()  # (rows, steps)
    sequences = torch.cat([expanded, new], dim=1).to(input_ids.device)
    if not args["return_dict_in_generate"]:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(run.scores) if want_scores else None,
        logits=tuple(run.logits) if want_logits else None,
    )


def _filter_arguments(args: dict, vocab: int, do_sample: bool, eos: tuple[int, ...]) -> dict:
    """The logits-processor arguments, checked as HF checks them, as SamplingParams fields.

    HF applies min_p and typical_p only when sampling (and checks them only then); an id in
    suppress_tokens / begin_suppress_tokens outside the vocabulary is ignored, as in HF."""
    out = {}
    n = args["no_repeat_ngram_size"]
    if n is not None and not isinstance(n, bool) and isinstance(n, numbers.Real) and n <= 0:
        n = 0
    if n:
        out["no_repeat_ngram_size"] = _integer("ngram_size", n, lambda v: v > 0,
                                               "a strictly positive integer")
    bad = args["bad_words_ids"]
    if bad is not None:
        if not isinstance(bad, list) or len(bad) == 0:
            raise ValueError(f"`bad_words_ids` has to be a non-empty list, but is {bad}.")
        if any(not isinstance(w, list) for w in bad):
            raise ValueError(f"`bad_words_ids` has to be a list of lists, but is {bad}.")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0
               for w in bad for t in w):
            raise ValueError(f"Each list in `bad_words_ids` has to be a list of positive integers, "
                             f"but is {bad}.")
        # HF drops one-token bad words that are EOS ids (ending stays possible)
        words = [tuple(int(t) for t in w) for w in bad if not (len(w) == 1 and int(w[0]) in eos)]
        if not words or any(len(w) == 0 for w in words):
            raise ValueError(f"`sequence_bias` has to be a non-empty dictionary, or non-empty list of "
                             f"lists but is {dict.fromkeys(words, float('-inf'))}.")
        outside = [t for w in words for t in w if t >= vocab]
        if outside:
            raise ValueError(f"The model vocabulary size is {vocab}, but the following tokens were "
                             f"being biased: {outside}")
        out["bad_words_ids"] = tuple(dict.fromkeys(words))
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        ids = args[name]
        if ids is None:
            continue
        ids = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids):
            raise ValueError(f"`{name}` has to be a list of token ids, but is {args[name]!r}")
        out[name] = tuple(int(t) for t in ids if 0 <= t < vocab)
    if do_sample:
        min_p = args["min_p"]
        if min_p is not None:
            if isinstance(min_p, bool) or not isinstance(min_p, numbers.Real) or not 0 <= min_p <= 1:
                raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p}")
            out["min_p"] = float(min_p)
        typical = args["typical_p"]
        if typical is not None and typical < 1.0:
            if isinstance(typical, bool) or not isinstance(typical, numbers.Real) or not typical > 0:
                raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {typical}")
            out["typical_p"] = float(typical)
    return out


def _beam_generate(model, input_ids, prompts, params, args, num_beams, n_return, length_penalty,
                   early_stopping, pad, eos, streamer, criteria, seed):
    """Beam search or beam sampling (`gptfast.beam`) and HF's `GenerateBeamDecoderOnlyOutput`
    layout. Beam sampling draws with torch.multinomial like HF: from torch's global RNG, or
    from a generator seeded with `seed`."""
    from .beam import beam_search

    if streamer is not None:
        raise ValueError("`streamer` cannot be used with beam search (yet!). Make sure that "
                         "`num_beams` is set to 1.")
    if criteria:
        raise ValueError("stopping_criteria are not supported with beam search by gptfast; "
                         "use max_new_tokens and eos_token_id")
    want_dict = bool(args["return_dict_in_generate"])
    want_scores = want_dict and bool(args["output_scores"])
    want_logits = want_dict and bool(args["output_logits"])
    # HF's fill value of unfinished positions: the pad id (0 counts as unset), else the first
    # EOS id; -1 without EOS ids
    fill = (pad or eos[0]) if eos else -1
    res = beam_search(model, prompts, params, num_beams=num_beams, num_return=n_return,
                      length_penalty=length_penalty, early_stopping=early_stopping, fill=fill,
                      want_scores=want_scores, want_logits=want_logits,
                      seed=seed)
    expanded = input_ids.repeat_interleave(n_return, dim=0).to(torch.long).cpu()
    device = input_ids.device
    sequences = torch.cat([expanded, res.sequences], dim=1).to(device)
    if not want_dict:
        return sequences
    return GenerateBeamOutput(
        sequences=sequences,
        sequences_scores=res.sequences_scores.to(device) if want_scores else None,
        scores=tuple(s.to(device) for s in res.scores) if want_scores else None,
        logits=tuple(t.to(device) for t in res.logits) if want_logits else None,
        beam_indices=res.beam_indices.to(device),
    )


def _ragged_prompts(input_ids, attention_mask, config, mask_source="attention_mask"):
    """Each row's real tokens (attention_mask == 1), checked."""
    from .model import check_token_ids

    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}; "
                         "use input_ids.unsqueeze(0) for a single prompt")
    if input_ids.dim() == 2 and input_ids.shape[0] == 0:
        raise ValueError("input_ids is an empty batch (0 rows)")
    B, T = check_token_ids(input_ids, config)
    ids = input_ids.cpu().to(torch.long)
    if attention_mask is None:
        return [row.tolist() for row in ids], None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask has shape {shape}, but input_ids has shape {(B, T)}; "
                         "they must match")
    mask = attention_mask.cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{mask_source} marks no real token in row(s) {empty}; every prompt "
                         "needs at least one")
    if bool((~mask[:, -1]).any()):
        warnings.warn("A decoder-only architecture is being used, but right-padding was detected! "
                      "gptfast generates from each row's real tokens (attention_mask == 1) and "
                      "appends the new tokens after the padding, as HF lays them out; set "
                      "`padding_side='left'` when initializing the tokenizer for the usual layout.",
                      UserWarning, stacklevel=4)
    return [ids[b][mask[b]].tolist() for b in range(B)], mask


def _criteria_list(criteria):
    if criteria is None:
        return []
    # HF's StoppingCriteriaList is a list of criteria; a single callable is accepted too.
    items = list(criteria) if isinstance(criteria, (list, tuple)) else [criteria]
    for c in items:
        if not callable(c):
            raise TypeError(f"stopping_criteria must hold callables, got {type(c).__name__}")
    return items


class _Run:
    """Collects the engine's tokens per output row and replays them step by step (in lockstep,
    as HF's loop produces them) to streamers, stopping criteria and score lists."""

    def __init__(self, engine, prompts, pad, streamer, criteria, want_scores, want_logits, vocab,
                 device):
        self.engine = engine
        self.prompts = prompts  # (rows, T) LongTensor on the CPU
        self.rows = prompts.shape[0]
        rows = self.rows
        self.pad = pad
        self.streamer = streamer
        self.criteria = criteria
        self.want_scores, self.want_logits = want_scores, want_logits
        self.vocab = vocab
        self.device = device
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.row_scores: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        self.row_logits: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        self.done = [False] * rows  # no more tokens will come for this row
        self.end = [None] * rows  # the row's final length, once known
        self.emitted = 0  # steps replayed so far
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.seq_rows: dict[int, int] = {}
        self.stopped: set[int] = set()  # rows a stopping criterion has flagged
        self.pad_stopped_rows = True

    def loop(self) -> None:
        engine = self.engine
        row_seq = {r: s for s, r in self.seq_rows.items()}
        while engine.has_unfinished():
            for out in engine.step():
                r = self.seq_rows[out.seq_id]
                if self.end[r] is not None:
                    continue
                self.tokens[r].append(out.token)
                if self.want_scores or self.criteria:
                    self.row_scores[r].append(out.scores)
                if self.want_logits:
                    self.row_logits[r].append(out.logits)
                if out.finished:
                    self.end[r] = len(self.tokens[r])
            self._replay(row_seq)
        self._replay(row_seq)

    def _replay(self, row_seq) -> None:
        """Emit every step that all unfinished rows have produced."""
        if not (self.streamer is not None or self.criteria or self.want_scores or self.want_logits):
            return  # nobody watches the steps: the tokens are assembled at the end
        while True:
            t = self.emitted
            live = [r for r in range(self.rows) if self.end[r] is None or self.end[r] > t]
            if not live:
                return
            if any(len(self.tokens[r]) <= t for r in live):
                return
            step = torch.full((self.rows,), self.pad if self.pad is not None else 0, dtype=torch.long)
            for r in live:
                step[r] = self.tokens[r][t]
            need_scores = self.want_scores or self.criteria
            scores = None
            if need_scores:
                scores = torch.full((self.rows, self.vocab), float("-inf"))
                for r in live:
                    scores[r] = self.row_scores[r][t]
                    self.row_scores[r][t] = None  # copied out: let the step's tensor go
                if self.want_scores:
                    self.scores.append(scores.to(self.device))
            if self.want_logits:
                logits = torch.full((self.rows, self.vocab), float("-inf"))
                for r in live:
                    logits[r] = self.row_logits[r][t]
                    self.row_logits[r][t] = None
                self.logits.append(logits.to(self.device))
            self.emitted = t + 1
            if self.streamer is not None:
                self.streamer.put(step)
            if self.criteria:
                seqs = self._sequences_so_far()
                stop = torch.zeros(self.rows, dtype=torch.bool)
                for c in self.criteria:
                    res = c(seqs, scores.to(self.device))
                    stop |= torch.as_tensor(res, dtype=torch.bool).cpu().expand(self.rows)
                # NOTE: like HF, a row a criterion stops is padded from then on only when an EOS
                # token is set; otherwise it keeps generating until every row is stopped.
                self.stopped |= {r for r in live if bool(stop[r])}
                if self.pad_stopped_rows:
                    cut = [r for r in live if r in self.stopped]
                elif all(r in self.stopped for r in live):
                    cut = live
                else:
                    cut = []
                for r in cut:
                    if self.end[r] is None or self.end[r] > t + 1:
                        self.end[r] = t + 1
                        del self.tokens[r][t + 1:]
                        self.engine.cancel(row_seq[r])

    def _sequences_so_far(self) -> torch.Tensor:
        new = self._tokens_tensor(self.emitted)
        return torch.cat([self.prompts, new], dim=1).to(self.device)

    def _tokens_tensor(self, width: int) -> torch.Tensor:
        pad = self.pad if self.pad is not None else 0
        out = torch.full((self.rows, width), pad, dtype=torch.long)
        for r, toks in enumerate(self.tokens):
            n = min(len(toks), width)
            if n:
                out[r, :n] = torch.tensor(toks[:n], dtype=torch.long)
        return out

    def new_tokens(self) -> torch.Tensor:
        width = max((len(t) for t in self.tokens), default=0)
        return self._tokens_tensor(width)


def patch_hf_generate(hf_model):
    """Make a transformers GPT2LMHeadModel's own `.generate(...)` run on gptfast.

    The model is converted on first use (and again whenever its weights change); arguments and
    outputs follow HF's. `unpatch_hf_generate` restores HF's method. Returns the model.

    Examples
    --------
    >>> model = gptfast.patch_hf_generate(GPT2LMHeadModel.from_pretrained("gpt2"))
    >>> model.generate(input_ids, max_new_tokens=20)  # gptfast underneath
    """
    _as_gptfast(hf_model)  # validates the model (and converts it once now)

    def generate_on_gptfast(inputs=None, **kwargs):
        input_ids = kwargs.pop("input_ids", inputs)
        return generate(hf_model, input_ids, **kwargs)

    generate_on_gptfast.__doc__ = generate.__doc__
    generate_on_gptfast._gptfast_patched = True
    hf_model.generate = generate_on_gptfast
    return hf_model


def unpatch_hf_generate(hf_model):
    """Undo `patch_hf_generate`: the model's `.generate` is HF's again. Returns the model."""
    if getattr(hf_model.__dict__.get("generate"), "_gptfast_patched", False):
        del hf_model.generate
    return hf_model

"""Hugging Face `generate()` arguments, resolved and checked into one `GenerateRequest`.

This is the only module that knows HF's argument names. Precedence is HF's: explicit keyword
arguments, then the `generation_config` passed in, then the checkpoint's generation defaults.
Every argument is checked with HF's wording where HF has a message; arguments that select
behaviour gptfast does not have are errors that name them, never silently ignored.

Prompts: a left-padded `(input_ids, attention_mask)` batch becomes ragged prompts (each row's real
tokens, positions counted from its first real token, exactly as HF's generate counts them).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .config import GPT2Config
from .engine import SamplingParams
from .model import check_token_ids

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
class GenerateRequest:
    """One `generate()` call's arguments, checked, with the defaults resolved.

    The generation length is kept as asked (`max_new_tokens` or `max_length`) until the prompts'
    length is known: see `sampling_params`.
    """

    eos: tuple[int, ...]  # end-of-sequence ids (may be empty)
    pad: int | None  # fills rows after they end; None only without EOS ids
    bos: int | None  # starts unconditional generation
    do_sample: bool
    temperature: float  # 1.0, top_k 0 and top_p 1.0 when greedy
    top_k: int
    top_p: float
    repetition_penalty: float
    filters: dict  # the other logits processors, as SamplingParams fields
    num_return: int  # num_return_sequences
    num_beams: int
    length_penalty: float
    early_stopping: bool | str | None
    seed: int | None
    max_new_tokens: Any  # as given (checked in `sampling_params`)
    max_length: Any
    max_length_given: bool  # False: HF's model-agnostic default of 20
    min_new_tokens: Any
    min_length: Any
    return_dict: bool
    want_scores: bool  # output_scores with return_dict_in_generate
    want_logits: bool  # output_logits with return_dict_in_generate


def resolve_request(config: GPT2Config, defaults: dict, generation_config, kwargs: dict,
                    seed) -> GenerateRequest:
    """Merge and check the arguments of one call (see `gptfast.generate`).

    Parameters
    ----------
    config : GPT2Config
        The model's (vocabulary size for the token-id checks).
    defaults : dict
        The checkpoint's generation defaults (HF names).
    generation_config : transformers.GenerationConfig, dict or None
    kwargs : dict
        The call's HF keyword arguments.
    seed : int or None

    Returns
    -------
    GenerateRequest
    """
    args, explicit = _merge_arguments(defaults, generation_config, kwargs)
    eos, pad = _special_tokens(args, config)
    do_sample, n_return, num_beams, length_penalty, early_stopping = _search(args)
    temperature, top_k, top_p, penalty = _sampling(args, do_sample)
    if seed is not None:
        seed = _integer("seed", seed, lambda v: True, "an int")
    want_dict = bool(args["return_dict_in_generate"])
    return GenerateRequest(
        eos=eos, pad=pad, bos=args["bos_token_id"], do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=penalty,
        filters=_filter_arguments(args, config.vocab_size, do_sample, eos),
        num_return=n_return, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, seed=seed, max_new_tokens=args["max_new_tokens"],
        max_length=args["max_length"], max_length_given="max_length" in explicit,
        min_new_tokens=args["min_new_tokens"], min_length=args["min_length"], return_dict=want_dict,
        want_scores=want_dict and bool(args["output_scores"]),
        want_logits=want_dict and bool(args["output_logits"]))


def _special_tokens(args: dict, config: GPT2Config) -> tuple[tuple[int, ...], int | None]:
    """The EOS ids and the pad id (the first EOS id when unset, with HF's warning)."""
    eos = _eos_list(args["eos_token_id"])
    for e in eos:
        if not 0 <= e < config.vocab_size:
            raise ValueError(f"`eos_token_id` is {e}, outside the vocabulary [0, {config.vocab_size})")
    pad = args["pad_token_id"]
    if isinstance(pad, torch.Tensor):
        pad = int(pad.item())
    if pad is None and eos:
        pad = eos[0]
        # stacklevel: here, resolve_request, generate, its inference_mode wrapper, the caller
        warnings.warn(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.",
                      UserWarning, stacklevel=5)
    if pad is not None:
        pad = _integer("pad_token_id", pad, lambda v: 0 <= v < config.vocab_size,
                       f"a token id in [0, {config.vocab_size})")
    return eos, pad


def _search(args: dict) -> tuple[bool, int, int, float, bool | str | None]:
    """do_sample, num_return_sequences, num_beams, length_penalty, early_stopping, checked."""
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
    return do_sample, n_return, num_beams, float(length_penalty), early_stopping


def _sampling(args: dict, do_sample: bool) -> tuple[float, int, float, float]:
    """temperature, top_k, top_p (checked when sampling; inert when greedy) and the repetition
    penalty."""
    temperature, top_k, top_p = 1.0, 0, 1.0
    if do_sample:
        temperature = 1.0 if args["temperature"] is None else args["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float, "
                             "otherwise your next token scores will be invalid. If you're looking "
                             "for greedy decoding strategies, set `do_sample=False`.")
        top_k = _integer("top_k", 0 if args["top_k"] is None else args["top_k"], lambda v: v >= 0,
                         "a non-negative integer (0 switches top-k off)")
        top_p = 1.0 if args["top_p"] is None else args["top_p"]
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"`top_p` has to be a float > 0 and <= 1, but is {top_p}")
    penalty = 1.0 if args["repetition_penalty"] is None else args["repetition_penalty"]
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not penalty > 0:
        raise ValueError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty}")
    return float(temperature), int(top_k), float(top_p), float(penalty)


def sampling_params(request: GenerateRequest, prompts: Prompts, criteria: list,
                    config: GPT2Config) -> SamplingParams:
    """The engine's per-sequence settings: the request's, with the generation length resolved
    against the prompts (HF's rules). A `MaxLengthCriteria` in `criteria` replaces the length
    limit, as in HF, and is taken out of the list."""
    max_length, max_length_given = request.max_length, request.max_length_given
    max_new = request.max_new_tokens
    for c in [c for c in criteria if type(c).__name__ == "MaxLengthCriteria"]:
        max_length, max_length_given, max_new = c.max_length, True, None
        criteria.remove(c)
    T = prompts.input_ids.shape[1]
    if max_new is not None:
        max_new = _integer("max_new_tokens", max_new, lambda v: v >= 1, "a positive integer")
    else:
        max_new = _max_new_from_length(max_length, max_length_given, T, config)
    longest = max(len(p) for p in prompts.rows)
    if longest + max_new > config.n_positions:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new} needs "
                         f"{longest + max_new} positions, but the model has n_positions="
                         f"{config.n_positions}; shorten the prompt or lower max_new_tokens")
    if request.min_new_tokens is not None:  # HF: min_new_tokens takes precedence over min_length
        min_new = _integer("min_new_tokens", request.min_new_tokens, lambda v: v >= 0,
                           "a non-negative integer")
    else:
        min_new = max(_integer("min_length", request.min_length or 0, lambda v: v >= 0,
                               "a non-negative integer") - T, 0)
    return SamplingParams(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=request.do_sample,
        temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
        repetition_penalty=request.repetition_penalty, eos_token_ids=request.eos, **request.filters)


def _max_new_from_length(max_length, given: bool, T: int, config: GPT2Config) -> int:
    """New tokens allowed by `max_length` (prompt included) for prompts `T` tokens wide."""
    max_length = _integer("max_length", max_length, lambda v: v >= 1, "a positive integer")
    if not given:
        # HF 5: by default always 20 new tokens, within the model's positions.
        # stacklevel: here, sampling_params, generate, its inference_mode wrapper, the caller
        warnings.warn(f"Using the model-agnostic default `max_length` (={max_length}) to "
                      "control the generation length. We recommend setting `max_new_tokens` "
                      "to control the maximum length of the generation.", UserWarning,
                      stacklevel=5)
        max_length = min(max_length + T, config.n_positions)
    if T >= max_length:
        raise ValueError(f"Input length of input_ids is {T}, but `max_length` is set to "
                         f"{max_length}. This can lead to unexpected behavior. You should "
                         "consider increasing `max_length` or, better yet, setting "
                         "`max_new_tokens`.")
    return max_length - T


@dataclass
class Prompts:
    """The prompts of one call: `input_ids` as given (B, T) (a single BOS token for unconditional
    generation) and each row's real tokens, in order."""

    input_ids: torch.Tensor
    rows: list[list[int]]


def build_prompts(input_ids, attention_mask, request: GenerateRequest, config: GPT2Config) -> Prompts:
    """Each row's real tokens: those `attention_mask` marks 1 (inferred as HF does when None).

    Parameters
    ----------
    input_ids : integer tensor (B, T) or None
        None: one prompt of the request's BOS token.
    attention_mask : (B, T) 0/1 tensor or None
    request : GenerateRequest
    config : GPT2Config

    Returns
    -------
    Prompts
    """
    if input_ids is None:
        if request.bos is None:
            raise ValueError("`input_ids` is None and the model has no `bos_token_id` to start "
                             "unconditional generation from; pass input_ids or bos_token_id")
        input_ids = torch.tensor([[request.bos]], dtype=torch.long)
        if attention_mask is not None:
            raise ValueError("attention_mask was given without input_ids")
    mask_source = "attention_mask"
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, request.pad, request.eos)
        mask_source = f"the attention mask inferred from pad_token_id={request.pad}"
    return Prompts(input_ids, _ragged_prompts(input_ids, attention_mask, config, mask_source))


def _infer_attention_mask(input_ids, pad, eos):
    """HF's rule when no mask is given: pad tokens are padding if the pad id occurs in the input
    and is not an EOS id; otherwise every token is real."""
    if pad is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return None
    if pad in eos or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()


def _ragged_prompts(input_ids, attention_mask, config, mask_source) -> list[list[int]]:
    """Each row's real tokens (attention_mask == 1), checked."""
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
        return [row.tolist() for row in ids]
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
        shape = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                 else type(attention_mask).__name__)
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
        # stacklevel: here, build_prompts, generate, its inference_mode wrapper, the caller
        warnings.warn("A decoder-only architecture is being used, but right-padding was detected! "
                      "gptfast generates from each row's real tokens (attention_mask == 1) and "
                      "appends the new tokens after the padding, as HF lays them out; set "
                      "`padding_side='left'` when initializing the tokenizer for the usual layout.",
                      UserWarning, stacklevel=5)
    return [ids[b][mask[b]].tolist() for b in range(B)]


def criteria_list(criteria) -> list:
    """`stopping_criteria` as a list of callables (HF's StoppingCriteriaList is a list; a single
    callable is accepted too)."""
    if criteria is None:
        return []
    items = list(criteria) if isinstance(criteria, (list, tuple)) else [criteria]
    for c in items:
        if not callable(c):
            raise TypeError(f"stopping_criteria must hold callables, got {type(c).__name__}")
    return items


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


def _merge_arguments(defaults: dict, generation_config, kwargs: dict) -> tuple[dict, set]:
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

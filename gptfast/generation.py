"""`generate()`: Hugging Face's `GPT2LMHeadModel.generate()` arguments and outputs on gptfast.

One call is a ladder of steps, each in its own layer:

1. `hf_convert.as_gptfast`: the model to run (an HF model is converted once and cached).
2. `hf_args.resolve_request`: every argument merged with the defaults and checked, into a
   `GenerateRequest`.
3. `hf_args.build_prompts` / `sampling_params`: the left-padded batch as ragged prompts, and the
   engine's per-sequence settings (the generation length resolved against the prompts).
4. Run: the engine, its outputs handed step by step to streamers, stopping criteria and score
   lists by `collector.LockstepCollector` (or `beam.beam_search` for beam search).
5. Assemble HF-shaped output: the input row, then the new tokens, padded with `pad_token_id`
   after a row ends.

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

from dataclasses import dataclass

import torch

from .collector import LockstepCollector
from .engine import Engine, NonFiniteLogitsError, SamplingParams
from .hf_args import GenerateRequest, Prompts, build_prompts, criteria_list, resolve_request, sampling_params
from .hf_convert import as_gptfast


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


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config=None, streamer=None, stopping_criteria=None, seed: int | None = None,
             kernels: str | None = None, cuda_graphs: bool | None = None, gemv_decode: bool | None = None,
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
    kernels : {"auto", "triton", "reference"} or None
        gptfast only: the op backend of the engine this call builds (None: the environment's
        GPTFAST_KERNELS, read when the engine is built); beam search too.
    cuda_graphs : bool or None
        gptfast only: replay the decode steps as CUDA graphs (None: GPTFAST_CUDA_GRAPHS, else on
        for CUDA with the Triton kernels); beam search too.
    gemv_decode : bool or None
        gptfast only: False runs decode steps of 1-8 rows on the unfused kernels instead of the
        fused GEMV ones (a benchmark baseline; None: True); beam search too.
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
    runtime = dict(kernels=kernels, cuda_graphs=cuda_graphs, gemv_decode=gemv_decode)  # the engine's options
    model, hf_defaults = as_gptfast(model)
    defaults = model.generation_defaults if hf_defaults is None else hf_defaults
    request = resolve_request(model.config, defaults, generation_config, kwargs, seed)
    prompts = build_prompts(input_ids, attention_mask, request, model.config)
    criteria = criteria_list(stopping_criteria)
    params = sampling_params(request, prompts, criteria, model.config)
    if request.num_beams > 1:
        return _beam_generate(model, request, prompts, params, streamer, criteria, runtime)
    seeds = _row_seeds(request, len(prompts.rows) * request.num_return)
    engine = _engine(model, request, criteria, runtime)
    collector = _run(engine, request, prompts, params, seeds, streamer, criteria)
    return _assemble(request, prompts, collector)


def _row_seeds(request: GenerateRequest, rows: int) -> list[int]:
    """Each output row's Philox key (greedy rows draw nothing: any key will do)."""
    from .ops.sampling import row_seeds

    seed = request.seed
    if seed is None:
        # Follow torch's global RNG like HF: a manual_seed before the call reproduces it.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item()) if request.do_sample else 0
    return row_seeds(seed, rows, "cpu").tolist()


def _engine(model, request: GenerateRequest, criteria: list, runtime: dict) -> Engine:
    """The engine for one call; it keeps each step's scores when anything reads them."""
    return Engine(model, keep_scores=request.want_scores or request.want_logits or bool(criteria),
                  **runtime)


def _run(engine: Engine, request: GenerateRequest, prompts: Prompts, params: SamplingParams,
         seeds: list[int], streamer, criteria: list) -> LockstepCollector:
    """Add every prompt's `num_return_sequences` sequences (adjacent output rows) and run the
    engine to the end. The engine is aborted and the streamer ended whatever happens."""
    n = request.num_return
    expanded = prompts.input_ids.repeat_interleave(n, dim=0).to(torch.long).cpu()  # (rows, T)
    if streamer is not None:
        streamer.put(expanded)
    seq_rows: dict[int, int] = {}
    try:
        for b, prompt in enumerate(prompts.rows):
            ids = engine.add(prompt, params, seeds[b * n:(b + 1) * n])
            seq_rows.update((sid, b * n + j) for j, sid in enumerate(ids))
        collector = LockstepCollector(engine, seq_rows, expanded, request.pad, streamer, criteria,
                                      cut_stopped_rows=bool(request.eos), want_scores=request.want_scores,
                                      want_logits=request.want_logits, vocab=engine.model.config.vocab_size,
                                      device=prompts.input_ids.device)
        collector.run()
    except NonFiniteLogitsError as e:
        row = seq_rows.get(e.seq_id)
        raise ValueError(f"row {'?' if row is None else row} of the output (batch index "
                         f"{(row or 0) // n}): the logits at generation step {e.index} hold "
                         f"{'NaN or +inf' if e.status == 1 else 'only -inf (every token masked)'}"
                         f"; no token can be sampled from them") from None
    finally:
        engine.abort()
        if streamer is not None:
            streamer.end()
    return collector


def _assemble(request: GenerateRequest, prompts: Prompts, collector: LockstepCollector):
    """HF's output: each row's prompt as given, then its new tokens (pad id after it ended)."""
    sequences = torch.cat([collector.prompts, collector.new_tokens()], dim=1).to(prompts.input_ids.device)
    if not request.return_dict:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(collector.scores) if request.want_scores else None,
        logits=tuple(collector.logits) if request.want_logits else None,
    )


def _beam_generate(model, request: GenerateRequest, prompts: Prompts, params: SamplingParams, streamer,
                   criteria: list, runtime: dict):
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
    eos, n_return = request.eos, request.num_return
    # HF's fill value of unfinished positions: the pad id (0 counts as unset), else the first
    # EOS id; -1 without EOS ids
    fill = (request.pad or eos[0]) if eos else -1
    res = beam_search(model, prompts.rows, params, num_beams=request.num_beams, num_return=n_return,
                      length_penalty=request.length_penalty, early_stopping=request.early_stopping, fill=fill,
                      want_scores=request.want_scores, want_logits=request.want_logits, seed=request.seed,
                      **runtime)
    expanded = prompts.input_ids.repeat_interleave(n_return, dim=0).to(torch.long).cpu()
    device = prompts.input_ids.device
    sequences = torch.cat([expanded, res.sequences], dim=1).to(device)
    if not request.return_dict:
        return sequences
    return GenerateBeamOutput(
        sequences=sequences,
        sequences_scores=res.sequences_scores.to(device) if request.want_scores else None,
        scores=tuple(s.to(device) for s in res.scores) if request.want_scores else None,
        logits=tuple(t.to(device) for t in res.logits) if request.want_logits else None,
        beam_indices=res.beam_indices.to(device),
    )


def patch_hf_generate(hf_model):
    """Make a transformers GPT2LMHeadModel's own `.generate(...)` run on gptfast.

    The model is converted on first use (and again whenever its weights change); arguments and
    outputs follow HF's. `unpatch_hf_generate` restores HF's method. Returns the model.

    Examples
    --------
    >>> model = gptfast.patch_hf_generate(GPT2LMHeadModel.from_pretrained("gpt2"))
    >>> model.generate(input_ids, max_new_tokens=20)  # gptfast underneath
    """
    as_gptfast(hf_model)  # validates the model (and converts it once now)

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

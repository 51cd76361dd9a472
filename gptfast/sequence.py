"""Request state: how a sequence is generated (`SamplingParams`), where it stands (`Sequence`,
its status and finish reason), what a step produces (`StepOutput`), and the checks of a request's
prompt and seeds.

The engine knows nothing of HF argument names: `generation` translates them into `SamplingParams`.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch


class SequenceStatus(str, enum.Enum):
    """Where a sequence stands in the engine (a str: compares equal to its value)."""

    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks; decoded every step
    FINISHED = "finished"

    __str__ = str.__str__
    __format__ = str.__format__


class FinishReason(str, enum.Enum):
    """Why a sequence finished (a str: compares equal to and prints as its value)."""

    EOS = "eos"  # drew an end-of-sequence token
    LENGTH = "length"  # reached max_new_tokens
    STOP = "stop"  # cancelled
    ERROR = "error"  # its logits could not be sampled from (no token)

    __str__ = str.__str__
    __format__ = str.__format__


class SampleStatus(enum.IntEnum):
    """The sampler's per-row status (`gptfast.ops.sample`)."""

    OK = 0  # a token was drawn
    NON_FINITE = 1  # the logits held NaN or +inf: no token (-1)
    ALL_MASKED = 2  # no finite logit (every token -inf): no token (-1)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated.

    max_new_tokens : tokens to generate at most.
    min_new_tokens : the end-of-sequence tokens are masked until this many were generated.
    do_sample : False means greedy (argmax, lowest id on ties).
    temperature, top_k, top_p : the sampling filters, applied in this order (HF semantics);
        top_k 0 and top_p 1.0 switch a filter off.
    repetition_penalty : CTRL's penalty on every token already in the sequence (1.0: off).
    eos_token_ids : tokens that end the sequence.
    no_repeat_ngram_size : no n-gram of this size occurs twice in prompt + output (0: off).
    bad_words_ids : token sequences never generated (the last token of each is banned after
        the others).
    suppress_tokens : tokens never generated; begin_suppress_tokens : not as the first token.
    min_p, typical_p : sampling filters applied after top-p, in this order (0.0 and 1.0: off);
        ignored by greedy rows, as in HF.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    min_p: float = 0.0
    typical_p: float = 1.0

    def __post_init__(self):
        def check(name, ok, allowed):
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        check("max_new_tokens", lambda v: integer(v) and v >= 1, "an int >= 1")
        check("min_new_tokens", lambda v: integer(v) and v >= 0, "an int >= 0")
        check("top_k", lambda v: integer(v) and v >= 0, "an int >= 0 (0: off)")
        check("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1: off)")
        check("repetition_penalty", lambda v: v > 0, "> 0 (1: off)")
        if self.do_sample:
            check("temperature", lambda v: v > 0, "> 0 when sampling")
        check("eos_token_ids", lambda v: all(integer(t) and t >= 0 for t in v),
              "a sequence of token ids")
        check("no_repeat_ngram_size", lambda v: integer(v) and v >= 0, "an int >= 0 (0: off)")
        check("bad_words_ids", lambda v: all(len(w) >= 1 and all(integer(t) and t >= 0 for t in w)
                                              for w in v), "a sequence of non-empty token-id sequences")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            check(name, lambda v: all(integer(t) and t >= 0 for t in v), "a sequence of token ids")
        check("min_p", lambda v: 0 <= v <= 1, "in [0, 1] (0: off)")
        check("typical_p", lambda v: 0 < v <= 1, "in (0, 1] (1: off)")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in self.bad_words_ids))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def eager_processing(self) -> bool:
        """Whether a decode step of this sequence needs the logits processors that run
        eagerly (its graph stops at the logits)."""
        return (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
                or bool(self.bad_words_ids) or bool(self.suppress_tokens) or self.warps_eagerly)

    @property
    def warps_eagerly(self) -> bool:
        """Whether sampling needs the filters the sampling kernel does not fuse (min_p, typical_p)."""
        return self.do_sample and (self.min_p > 0 or self.typical_p < 1)


@dataclass(eq=False, slots=True)
class Sequence:
    """One sequence the engine generates: its tokens so far and where it stands."""

    seq_id: int
    prompt_len: int
    tokens: list[int]  # prompt + generated so far
    params: SamplingParams
    seed: int  # Philox key of this sequence's draws
    arrival: int  # admission order; the newest running sequence is preempted first
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Sequences forked from this one right after its prefill (num_return_sequences).
    fork_children: list[Sequence] = field(default_factory=list)
    fork_parent: Sequence | None = None  # while this is a fork child not started yet
    num_cached_tokens: int = 0  # tokens whose K/V are in the cache (all but the newest while running)
    num_preemptions: int = 0
    # NOTE: len(tokens) - prompt_len, kept as a field: the decode step reads it for every row.
    num_generated: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass(slots=True)
class StepOutput:
    """One token produced by a step. `logits` / `scores`: the raw and the processed (filtered)
    logits row it was drawn from, fp32 (V,), when the engine keeps them."""

    seq_id: int
    token: int
    index: int  # 0 for the first generated token
    finished: bool
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class NonFiniteLogitsError(ValueError):
    """A sequence's logits held NaN or +inf, or no finite value at all, while sampling."""

    def __init__(self, seq_id: int, index: int, status: int):
        self.seq_id, self.index, self.status = seq_id, index, SampleStatus(status)
        what = "NaN or +inf" if status == SampleStatus.NON_FINITE else "only -inf (every token masked)"
        super().__init__(f"sequence {seq_id}: the logits for generated token {index} hold {what}; "
                         f"no token can be drawn from them")


def _integer_like(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_prompt(prompt, vocab_size: int) -> list[int]:
    """`prompt` as a list of Python ints, checked: a list or tuple of ints or a 1-D integer numpy
    array or tensor, non-empty, every id in [0, vocab_size)."""
    if isinstance(prompt, (torch.Tensor, np.ndarray)):
        shape = tuple(prompt.shape)
        if len(shape) != 1:
            raise ValueError(f"a prompt must be 1-D (one sequence of token ids), got shape {shape}")
        dtype = prompt.dtype
        integer = (dtype.kind in "iu" if isinstance(prompt, np.ndarray)
                   else not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool))
        if not integer:
            raise TypeError(f"prompt token ids must be integers, got a {type(prompt).__name__} of "
                            f"dtype {dtype}")
        tokens = prompt.tolist()
    elif isinstance(prompt, (list, tuple, range)):
        tokens = list(prompt)
        if any(type(t) is not int for t in tokens):  # fast path: plain ints
            for i, t in enumerate(tokens):
                if not _integer_like(t):
                    raise TypeError(f"prompt token ids must be integers, got {t!r} "
                                    f"({type(t).__name__}) at index {i}")
            tokens = [int(t) for t in tokens]
    else:
        raise TypeError(f"a prompt must be a list of token ids or a 1-D integer numpy array or "
                        f"tensor, got {type(prompt).__name__}")
    if not tokens:
        raise ValueError("a prompt needs at least one token")
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        bad = next(t for t in tokens if not 0 <= t < vocab_size)
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    return tokens


def check_seeds(seeds) -> list[int]:
    """`seeds` as a list of Python ints in int64's range (the Philox keys are int64 tensors)."""
    if isinstance(seeds, (torch.Tensor, np.ndarray)):
        if seeds.ndim != 1:
            raise ValueError(f"seeds must be 1-D, got shape {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    if not isinstance(seeds, (list, tuple, range)):
        raise TypeError(f"seeds must be a list of ints (one per sequence), got {type(seeds).__name__}")
    if not seeds:
        raise ValueError("add() needs at least one seed (one per sequence)")
    for i, s in enumerate(seeds):
        if not _integer_like(s):
            raise TypeError(f"seeds must be integers, got {s!r} ({type(s).__name__}) at index {i}")
        if not -2**63 <= s < 2**63:
            raise ValueError(f"seed {s} at index {i} is outside int64 [-2**63, 2**63)")
    return [int(s) for s in seeds]

"""The engine: a continuous-batching scheduler over the paged KV cache.

Each `step()` is either a prefill of newly admitted sequences (all their uncached prompt tokens
as one flattened batch, no padding) or a decode step (one token for every running sequence).
Sequences are admitted while the block manager has room; when a decode step needs more blocks
than are free, the newest running sequence is preempted: its blocks are freed and it waits to be
recomputed from its prompt and the tokens it already produced (prefix caching usually makes that
cheap). Sampling randomness is keyed by each sequence's seed and the index of the token being
drawn, never by the schedule, and no value of another sequence enters a sequence's computation:
preemption and batch composition change its logits only by floating-point rounding (a matmul
over another batch size may sum in another order), which can move a token only at a near-tie.

The engine knows nothing of HF argument names: `generation.py` translates them into
`SamplingParams`.
"""

from __future__ import annotations

import bisect
import collections
import numbers
import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from . import graphs, ops, processors
from .kv_cache import AttnMetadata



def graphs_setting() -> bool | None:
    """`GPTFAST_CUDA_GRAPHS`: 0 switches the graph runner off, 1 on (on the CPU: its static-buffer
    step run eagerly, to test that path), unset means on for CUDA models only."""
    value = os.environ.get("GPTFAST_CUDA_GRAPHS", "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"GPTFAST_CUDA_GRAPHS must be 0, 1 or unset, got {value!r}")
    return value == "1"


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


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    seq_id: int
    prompt_len: int
    tokens: list[int]  # prompt + generated so far
    params: SamplingParams
    seed: int  # Philox key of this sequence's draws
    arrival: int  # admission order; the newest running sequence is preempted first
    status: str = WAITING
    finish_reason: str | None = None  # "eos", "length", "stop" (cancelled), "error" (no token)
    # Sequences forked from this one right after its prefill (num_return_sequences).
    fork_children: list["Sequence"] = field(default_factory=list)
    fork_parent: Sequence | None = None  # while this is a fork child not started yet
    in_cache: int = 0  # tokens whose K/V are in the cache (all but the newest while running)
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


@dataclass(slots=True)
class _InFlight:
    """A graph decode step launched but not read yet: its launch id, the engine's output slot it
    lands in, its rows (in batch order), and whether it was launched ahead (before the previous
    step's tokens were read, by an earlier `step()` call)."""

    launch: int
    slot: int
    seqs: list[Sequence]
    ahead: bool


class NonFiniteLogitsError(ValueError):
    """A sequence's logits held NaN or +inf, or no finite value at all, while sampling."""

    def __init__(self, seq_id: int, index: int, status: int):
        self.seq_id, self.index, self.status = seq_id, index, status
        what = "NaN or +inf" if status == 1 else "only -inf (every token masked)"
        super().__init__(f"sequence {seq_id}: the logits for generated token {index} hold {what}; "
                         f"no token can be drawn from them")


class Engine:
    """Continuous batching over a `GPT2` model's paged KV cache.

    Parameters
    ----------
    model : gptfast.GPT2
    max_num_seqs : int
        Most sequences in one decode step.
    max_prefill_tokens : int or None
        Most new tokens in one prefill step (None: 8 full-length sequences on CUDA,
        max(2048, n_positions) on the CPU).
    keep_scores : bool
        Return each step's raw logits and processed scores in the `StepOutput`s.
    cuda_graphs : bool or None
        Run decode steps through the model's `gptfast.graphs.DecodeGraphRunner` (CUDA graphs
        per batch-size bucket, captured once per model). None: the environment's
        `GPTFAST_CUDA_GRAPHS` (0 or 1), else on for CUDA models. True on the CPU runs the
        runner's static-buffer step eagerly (there is nothing to capture); the tests use it to
        check that path.
    steps_in_flight : int
        Decode steps the graph path keeps queued on the device: 2 (default) launches step t+1
        before reading step t's tokens, so the GPU never waits for the host between steps; 1
        reads every step's tokens before launching the next. A step runs with 1 whenever a row
        needs the host before its next draw (logits processors, score outputs, a row about to
        reach max_new_tokens, sequences waiting to be admitted). Outputs do not depend on it.

    Notes
    -----
    Sharing a model. Any number of engines may use one model, from one thread or many (one
    engine per thread; a single engine is driven by one thread at a time). Their steps take
    turns under the model's KV-cache lock, so a prompt's blocks become prefix-cache hits for the
    others only once their K/V are written. When the pool runs short, the stepping engine
    preempts the newest running sequence of any engine on the model (never its own last one):
    every step makes progress, and a preempted sequence is recomputed later with the same tokens.

    Failures. A step that raises (other than `NonFiniteLogitsError`) puts every running sequence
    of this engine back to waiting and drops the prefix cache (blocks it filled may hold hashes
    of K/V never written); stepping again continues with the same tokens. An engine dropped
    without `abort()` gives its blocks back when it is collected.

    Weights. Before reusing a cached prefix, an engine checks the model's weights against those
    the cache was computed from (parameter identities and PyTorch version counters) and drops the
    prefix cache if they changed. The K/V of sequences already running are not recomputed.

    Examples
    --------
    >>> engine = Engine(model)
    >>> [sid] = engine.add([1, 2, 3], SamplingParams(max_new_tokens=8), seeds=[0])
    >>> while engine.has_unfinished():
    ...     for out in engine.step():
    ...         print(out.seq_id, out.token)
    """

    def __init__(self, model, max_num_seqs: int = 256, max_prefill_tokens: int | None = None,
                 keep_scores: bool = False, cuda_graphs: bool | None = None, steps_in_flight: int = 2):
        self.model = model
        self.cache = model.kv_cache
        self.manager = self.cache.manager
        self.block_size = self.cache.block_size
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        self.max_num_seqs = max_num_seqs
        if steps_in_flight not in (1, 2) or isinstance(steps_in_flight, bool):
            raise ValueError(f"steps_in_flight must be 1 or 2, got {steps_in_flight!r}")
        self.steps_in_flight = steps_in_flight
        self._inflight: _InFlight | None = None  # a graph step whose tokens are not read yet
        self._out_slots: list = []  # the runner's host output slots this engine alternates
        reference = ops.kernel_backend() == "reference"
        if cuda_graphs is None:
            cuda_graphs = graphs_setting()
        if cuda_graphs is None:
            # the eager references sync with the host (they cannot be captured)
            cuda_graphs = self.device.type == "cuda" and not reference
        if cuda_graphs and reference and self.device.type == "cuda":
            raise ValueError("CUDA graphs cannot capture the eager reference ops (they sync with the "
                             "host): unset GPTFAST_KERNELS=reference or turn the graphs off "
                             "(cuda_graphs=False or GPTFAST_CUDA_GRAPHS=0)")
        # NOTE: the runner is the model's (captured once per model), shared by its engines.
        self._graph_batch = min(max_num_seqs, graphs.MAX_BATCH)
        with self.cache.lock:
            self.runner = graphs.graph_runner(model, self._graph_batch) if cuda_graphs else None
        self._weights_version = model.weights_version
        if max_prefill_tokens is None:
            n = model.config.n_positions
            max_prefill_tokens = 8 * n if self.device.type == "cuda" else max(2048, n)
        self.max_prefill_tokens = max_prefill_tokens
        self.keep_scores = keep_scores
        # NOTE: cancelled sequences stay in `waiting` (finished) until they reach its head, so
        # that a cancel is O(1); `_num_waiting` counts the live ones.
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._num_waiting = 0
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence, by id
        # Outputs produced but not yet handed out (a stream closed mid-step, a step that raised
        # NonFiniteLogitsError for another row): the next step() or stream() returns them first.
        self._pending: collections.deque[StepOutput] = collections.deque()
        self._issued: list[list[int]] = []  # [start, end) ranges of the ids this engine issued
        # Counters for tests and benchmarks.
        self.num_prefill_tokens = 0  # tokens computed by prefill steps (cache hits excluded)
        self.num_preemptions = 0
        self.num_steps = 0
        with self.cache.lock:
            self.cache.engines.add(self)
            if self.cache.weights_fingerprint is None and self.manager.num_cached_blocks() == 0:
                # Nothing cached yet: whatever is cached from now on comes from these weights.
                self.cache.weights_fingerprint = weights_fingerprint(model)
        # NOTE: the finalizer holds the cache and the sequence table, never the engine, so an
        # engine dropped without abort() is collected and its blocks go back to the pool.
        weakref.finalize(self, _release_blocks, self.cache, self.seqs)
        self.num_steps_ahead = 0  # decode steps launched before the previous one's tokens were read

    # ------------------------------------------------------------------ requests
    def add(self, prompt, params: SamplingParams, seeds) -> list[int]:
        """Queue sequences continuing `prompt`. Every argument is checked before anything changes.

        Parameters
        ----------
        prompt : list or tuple of int, or 1-D integer numpy array or torch tensor
            Token ids in [0, vocab_size), at least one.
        params : SamplingParams
            Its `eos_token_ids` must lie in the vocabulary.
        seeds : sequence of int
            One per sequence, each in [-2**63, 2**63): its Philox key. The prompt is computed
            once and shared by all of them.

        Returns
        -------
        list of int: the sequences' ids, in the order of `seeds`.

        Raises
        ------
        TypeError for a prompt, seed or params of the wrong type (float or bool token ids
        included); ValueError for values out of range or a request the pool can never hold.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        config = self.model.config
        prompt = _token_list(prompt, config.vocab_size)
        seeds = _seed_list(seeds)
        bad_eos = [e for e in params.eos_token_ids if e >= config.vocab_size]
        if bad_eos:
            raise ValueError(f"params.eos_token_ids holds {bad_eos[0]}, outside the vocabulary "
                             f"[0, {config.vocab_size})")
        if len(prompt) + params.max_new_tokens > config.n_positions:
            raise ValueError(f"{len(prompt)} prompt + {params.max_new_tokens} new tokens exceed the "
                             f"model's n_positions ({config.n_positions})")
        # The last generated token is never fed back, so its K/V needs no slot.
        need = -(-(len(prompt) + params.max_new_tokens - 1) // self.block_size)
        if need > self.manager.total_blocks:
            raise ValueError(
                f"a sequence of {len(prompt)} prompt + {params.max_new_tokens} new tokens needs "
                f"{need} KV blocks of {self.block_size} tokens, but the pool has only "
                f"{self.manager.total_blocks}; load the model with a larger num_kv_blocks")
        with self.cache.lock:
            # NOTE: ids come from the cache: engines sharing a model share its block manager.
            # The first id doubles as the arrival order, which is model-wide for preemption.
            ids = self.cache.new_sequence_ids(len(seeds))
            seqs = [Sequence(sid, len(prompt), list(prompt), params, seed, ids.start)
                    for sid, seed in zip(ids, seeds)]
            head, head.fork_children = seqs[0], seqs[1:]
            for child in head.fork_children:
                child.fork_parent = head
            for s in seqs:
                self.seqs[s.seq_id] = s
            self.waiting.append(head)
            self._num_waiting += 1
            if self._issued and self._issued[-1][1] == ids.start:
                self._issued[-1][1] = ids.stop
            else:
                self._issued.append([ids.start, ids.stop])
        return list(ids)

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence now (finish reason "stop") and release its blocks, in O(1) for a
        waiting sequence. Cancelling a sequence that already finished does nothing.

        Raises
        ------
        KeyError if this engine never issued `seq_id`.
        """
        with self.cache.lock:
            seq = self.seqs.get(seq_id)
            if seq is None:
                if not self._was_issued(seq_id):
                    raise KeyError(f"cancel(): sequence id {seq_id!r} was never issued by this Engine")
                return  # finished already
            if seq.status == RUNNING:
                self.running.remove(seq)
                self.manager.free(seq.seq_id)
            elif seq.fork_parent is not None:  # a fork child not started yet
                seq.fork_parent.fork_children.remove(seq)
                seq.fork_parent = None
            else:
                # Left in the queue, finished: the admission skips it. Its fork children were
                # never started: they continue as plain waiting sequences.
                self._num_waiting += len(seq.fork_children) - 1
                for child in reversed(seq.fork_children):
                    child.fork_parent = None
                    self.waiting.appendleft(child)
                seq.fork_children = []
            self._finish(seq, "stop")

    def _was_issued(self, seq_id) -> bool:
        if not isinstance(seq_id, numbers.Integral) or isinstance(seq_id, bool):
            return False
        i = bisect.bisect_right(self._issued, [seq_id, float("inf")]) - 1
        return i >= 0 and self._issued[i][0] <= seq_id < self._issued[i][1]

    def beam_search(self, prompts: list[list[int]], params: SamplingParams, num_beams: int,
                    num_return: int = 1, length_penalty: float = 1.0, early_stopping=False,
                    seed: int | None = None):
        """Run a beam search on this engine's model to completion (`gptfast.beam`).

        Parameters
        ----------
        prompts : list of token-id lists, one search per prompt.
        params : SamplingParams
            Length limits, EOS ids and logits processors; `do_sample=True` is beam sampling.
        num_beams : int >= 2; num_return : hypotheses per prompt, 1..num_beams.
        length_penalty : exponent of the generated length dividing a hypothesis' score.
        early_stopping : True, False or "never" (HF's meanings).
        seed : beam sampling's generator seed (None: torch's global RNG).

        Returns
        -------
        gptfast.beam.BeamResult: generated tokens (B * num_return, new) padded with the first
        EOS id (-1 without one), their scores and beam indices, and the peak KV blocks held.
        The beams take their blocks from the same pool as this engine's running sequences,
        which keep theirs and continue at the next `step()`.

        Examples
        --------
        >>> res = engine.beam_search([prompt], SamplingParams(max_new_tokens=16), num_beams=4)
        >>> best = res.sequences[0]
        """
        from .beam import beam_search

        if not isinstance(num_beams, int) or num_beams < 2:
            raise ValueError(f"num_beams must be an int >= 2, got {num_beams!r}")
        if not isinstance(num_return, int) or not 1 <= num_return <= num_beams:
            raise ValueError(f"num_return must be an int in [1, num_beams={num_beams}], got {num_return!r}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        if not prompts or any(not p for p in prompts):
            raise ValueError("beam_search needs at least one prompt, each with at least one token")
        config = self.model.config
        for p in prompts:
            bad = [t for t in p if not 0 <= t < config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
            if len(p) + params.max_new_tokens > config.n_positions:
                raise ValueError(f"{len(p)} prompt + {params.max_new_tokens} new tokens exceed the "
                                 f"model's n_positions ({config.n_positions})")
        eos = params.eos_token_ids
        return beam_search(self.model, [list(p) for p in prompts], params, num_beams=num_beams,
                           num_return=num_return, length_penalty=float(length_penalty),
                           early_stopping=early_stopping, fill=eos[0] if eos else -1,
                           seed=seed)

    def has_unfinished(self) -> bool:
        """Whether any sequence is still waiting or running, or outputs are still to be returned."""
        return bool(self._num_waiting or self.running or self._pending)

    def stream(self):
        """Step until every sequence has finished, yielding each `StepOutput` as it is produced.

        Requests may be added (`add`) and cancelled (`cancel`) between the outputs: they join or
        leave at the next step. A request's tokens are the outputs with its `seq_id`. Leaving the
        loop early (break, close) loses nothing: the outputs of the last step not yet yielded
        are returned first by the next `step()` or `stream()`.

        Examples
        --------
        >>> [a] = engine.add(prompt_a, SamplingParams(max_new_tokens=16), seeds=[0])
        >>> for out in engine.stream():
        ...     if out.seq_id == a and out.index == 3:
        ...         engine.add(prompt_b, SamplingParams(max_new_tokens=8), seeds=[1])
        """
        while self.has_unfinished():
            self._pending.extend(self.step())
            while self._pending:
                yield self._pending.popleft()

    def abort(self) -> None:
        """Drop every sequence (and outputs not yet returned) and give all their blocks back
        (after an error or interrupt)."""
        with self.cache.lock:
            for seq in self.running:
                self.manager.free(seq.seq_id)
            for seq in self.seqs.values():
                seq.status = FINISHED
            self.running.clear()
            self.waiting.clear()
            self._num_waiting = 0
            self.seqs.clear()
            self._pending.clear()
            self._inflight = None  # a step still on the device writes only the slots just freed

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = FINISHED, reason
        self.seqs.pop(seq.seq_id, None)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one step: a prefill of newly admitted sequences if any can be admitted, else a
        decode step of every running sequence. Outputs not yet returned (see `stream`) are
        returned first, without running the model.

        Returns
        -------
        list of StepOutput: one per token produced, in the order of the step's batch. Raises
        NonFiniteLogitsError (after finishing that sequence; the step's other outputs are
        returned by the next call) when a sequence's logits cannot be sampled from. Any other
        exception leaves the engine consistent (see the class notes): stepping again continues.
        """
        if self._pending:
            outs = list(self._pending)
            self._pending.clear()
            return outs
        with self.cache.lock:
            self.num_steps += 1
            if self.model._kv_cache is not self.cache:
                raise RuntimeError("the model was moved or cast while this Engine was using it (its "
                                   "KV cache was replaced); create a new Engine")
            try:
                if self._inflight is not None:
                    outs = self._complete_inflight()
                    if outs is not None:
                        return outs
                admitted = self._admit()
                if admitted:
                    return self._prefill(admitted)
                if self.running:
                    return self._decode()
            except NonFiniteLogitsError:
                raise
            except BaseException:
                self._roll_back()
                raise
            if self._num_waiting:
                raise RuntimeError(self._pool_report("the next waiting sequence does not fit even "
                                                     "with nothing else running"))
            return []

    def _roll_back(self) -> None:
        """After a step failed midway: every running sequence waits to be recomputed, and no
        prefix hash of a block whose K/V may be unwritten survives."""
        self._inflight = None  # its rows are recomputed (a step on the device writes only their old slots)
        for seq in sorted(self.running, key=lambda s: (s.arrival, s.seq_id), reverse=True):
            self._preempt(seq)
        self.manager.reset_prefix_cache()

    def _pool_report(self, what: str) -> str:
        """An error message saying who holds the pool's blocks."""
        m = self.manager
        ours = len(self.running)
        others = sum(len(e.running) for e in list(self.cache.engines) if e is not self)
        orphans = m.num_sequences() - ours - others
        return (f"{what}: the KV-cache pool has {m.total_blocks} blocks, {m.num_free_blocks()} free; "
                f"{ours} sequences of this engine, {others} of other engines on the model and "
                f"{orphans} held outside any live Engine hold the rest")

    def _newest_victim(self, own_too: bool) -> tuple[Engine, Sequence] | None:
        """The newest running sequence of the engines on this model (this engine's only when
        `own_too`), with its engine: the one to preempt when blocks run short."""
        best = None
        for engine in list(self.cache.engines):
            if engine is self and not own_too:
                continue
            for s in engine.running:
                if best is None or (s.arrival, s.seq_id) > (best[1].arrival, best[1].seq_id):
                    best = (engine, s)
        return best

    def _weights_unchanged(self) -> bool:
        """Whether the cached prefixes were computed from the model's current weights; if not,
        they are dropped and the current weights recorded."""
        return self.cache.check_weights(weights_fingerprint(self.model))

    def _admit(self) -> list[Sequence]:
        admitted, budget, weights_checked = [], self.max_prefill_tokens, False
        while self.waiting:
            seq = self.waiting[0]
            if seq.status == FINISHED:  # cancelled while waiting
                self.waiting.popleft()
                continue
            # fork children run as soon as their parent's prefill is done
            if self.running and len(self.running) + 1 + len(seq.fork_children) > self.max_num_seqs:
                break
            if admitted and len(seq.tokens) > budget:
                break
            tokens = np.asarray(seq.tokens, dtype=np.int64)
            cached = self.manager.allocate_prompt(seq.seq_id, tokens)
            if cached > 0 and not weights_checked:
                # A prefix hit: only valid if the weights did not change since it was computed.
                weights_checked = True
                if not self._weights_unchanged():
                    self.manager.free(seq.seq_id)
                    cached = self.manager.allocate_prompt(seq.seq_id, tokens)
            if cached < 0:
                if self.running or admitted:
                    break  # not enough free blocks: wait for running sequences to finish
                # Nothing of this engine runs: take the blocks of other engines' newest sequences.
                victim = self._newest_victim(own_too=False)
                if victim is None:
                    break
                victim[0]._preempt(victim[1])
                continue
            self.waiting.popleft()
            self._num_waiting -= 1
            seq.in_cache = cached
            seq.status = RUNNING
            # NOTE: running from the moment it holds blocks, so an error before its prefill
            # completes frees them (see _roll_back).
            self.running.append(seq)
            admitted.append(seq)
            budget -= len(seq.tokens) - cached
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        starts = [s.in_cache for s in seqs]
        lens = [len(s.tokens) for s in seqs]
        n_new = [n - c for n, c in zip(lens, starts)]
        total = sum(n_new)
        self.num_prefill_tokens += total
        tokens = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        cu = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(n_new, out=cu[1:])
        for i, s in enumerate(seqs):
            a, b = cu[i], cu[i + 1]
            tokens[a:b] = s.tokens[starts[i]:]
            positions[a:b] = np.arange(starts[i], lens[i])
            self.manager.slot_mapping(s.seq_id, starts[i], lens[i], slots[a:b])
        meta = AttnMetadata(
            slot_mapping=self._to_device(slots),
            block_tables=self._block_tables(self._ids_array(seqs), max(lens)),
            seq_lens=self._to_device(np.asarray(lens, dtype=np.int32)),
            cu_seqlens_q=self._to_device(cu),
            max_seqlen_q=max(n_new),
            is_decode=False,
        )
        last = self._to_device(cu[1:].astype(np.int64) - 1)
        logits = self.model.forward_paged(self._to_device(tokens), self._to_device(positions),
                                          meta, last, cache=self.cache)  # (B, V) fp32
        for s in seqs:
            s.in_cache = len(s.tokens)

        # Fork children share the prompt's blocks and draw their first token from its logits.
        rows, batch = [], []
        for i, s in enumerate(seqs):
            rows.append(i)
            batch.append(s)
            for child in s.fork_children:
                self.manager.fork(s.seq_id, child.seq_id)
                child.in_cache, child.status, child.fork_parent = s.in_cache, RUNNING, None
                self.running.append(child)
                rows.append(i)
                batch.append(child)
            s.fork_children = []
        if len(rows) != len(seqs):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        return self._sample(batch, logits)

    def _decode(self) -> list[StepOutput]:
        ids = self._ids_array(self.running)
        while self.manager.blocks_needed_for_append(ids) > self.manager.num_free_blocks():
            victim = self._newest_victim(own_too=len(self.running) > 1)
            if victim is None:
                break  # _append reports what holds the pool
            victim[0]._preempt(victim[1])
            if victim[0] is self:
                ids = self._ids_array(self.running)
        seqs = self.running
        B = len(seqs)
        if self.runner is not None and B <= self.runner.max_batch:
            if self.model.weights_version != self._weights_version:
                # parameter tensors may have been replaced: the graphs hold the old addresses
                self.runner = graphs.graph_runner(self.model, self._graph_batch)
                self._weights_version = self.model.weights_version
            return self._decode_static(seqs, ids)
        tokens = np.fromiter((s.tokens[-1] for s in seqs), dtype=np.int64, count=B)
        slots = np.empty(B, dtype=np.int64)
        self._append(ids, tokens, slots)
        lens = np.fromiter((len(s.tokens) for s in seqs), dtype=np.int32, count=B)
        meta = AttnMetadata(
            slot_mapping=self._to_device(slots),
            block_tables=self._block_tables(ids, int(lens.max())),
            seq_lens=self._to_device(lens),
            cu_seqlens_q=None,
            max_seqlen_q=1,
            is_decode=True,
        )
        logits = self.model.forward_paged(self._to_device(tokens),
                                          self._to_device(lens.astype(np.int64) - 1), meta,
                                          cache=self.cache)
        for s in seqs:
            s.in_cache = len(s.tokens)
        return self._sample(list(seqs), logits)

    def _append(self, ids: np.ndarray, tokens: np.ndarray, slots: np.ndarray) -> None:
        """Give each running sequence a slot for its newest token (copy-on-write included)."""
        cow = np.empty((len(ids), 2), dtype=np.int64)
        n_cow = self.manager.append_tokens(ids, tokens, slots, cow)
        if n_cow < 0:
            raise RuntimeError(self._pool_report("no block is left for the next token of this "
                                                 "engine's only running sequence"))
        if n_cow:
            self.cache.copy_blocks(torch.from_numpy(cow[:n_cow]))

    def _decode_static(self, seqs: list[Sequence], ids: np.ndarray, appended: bool = False) -> list[StepOutput]:
        """The decode step through the graph runner: its host buffers are filled in place (the
        block manager writes slots and block tables straight into them), then one replay.
        `appended`: the manager already holds every row's newest token (a step launched ahead
        was dropped); the step derives its slots from the block tables."""
        runner, B = self.runner, len(seqs)
        buf = runner.np
        tokens = buf["tokens"][:B]
        tokens[:] = [s.tokens[-1] for s in seqs]
        if not appended:
            self._append(ids, tokens, buf["slot_mapping"][:B])
        lens = buf["seq_lens"][:B]
        lens[:] = [len(s.tokens) for s in seqs]
        np.subtract(lens, 1, out=buf["positions"][:B])
        self.manager.block_tables(ids, buf["block_tables"][:B])
        offsets = buf["offsets"][:B]
        offsets[:] = [s.num_generated for s in seqs]
        if runner.rows_owner() is not self or runner.rows != seqs:
            # NOTE: per-sequence constants are written only when the batch changed (the buffers
            # are the model's: another engine on it may have written them since).
            runner.rows_owner, runner.rows = weakref.ref(self), list(seqs)
            buf["seeds"][:B] = [s.seed for s in seqs]
            buf["temperature"][:B] = [s.params.temperature if s.params.do_sample else 0.0 for s in seqs]
            buf["top_k"][:B] = [s.params.top_k for s in seqs]
            buf["top_p"][:B] = [s.params.top_p for s in seqs]
            self._penalty = any(s.params.eager_processing for s in seqs)
            # each row's min_new_tokens where it has EOS ids to mask (0: nothing to mask)
            min_new = np.array([s.params.min_new_tokens if s.params.eos_token_ids else 0
                                for s in seqs], dtype=np.int64)
            self._min_new = min_new if min_new.any() else None  # None: no row ever masks EOS
        for s in seqs:
            s.in_cache = len(s.tokens)
        if (self.keep_scores or self._penalty
                or (self._min_new is not None and bool((offsets < self._min_new).any()))):
            # The logits processors (and score outputs) see the logits before the draw: the
            # graph stops at the logits and the sampler runs eagerly.
            return self._sample(list(seqs), runner.run(B, sample=False))
        if not self._out_slots or self._out_slots[0].max_batch != runner.max_batch:
            self._out_slots = [runner.output_slot(), runner.output_slot()]  # (a rebuilt runner)
        launch = runner.launch(B, self._out_slots[0])
        self._inflight = _InFlight(launch, 0, list(seqs), ahead=False)
        return self._complete_inflight()

    def _complete_inflight(self) -> list[StepOutput] | None:
        """Read and commit the tokens of the graph step in flight; first, when every row can take
        one more step without the host, launch that step (it continues this one on the device),
        so the GPU has it queued while the host reads, commits and returns.

        EOS is seen one step late: a row that ends now already has its next step launched. That
        step's K/V goes into a slot the block manager holds (the ended token is appended before the
        row's blocks are freed) and its token is dropped unread. Returns None when no row of the
        step in flight is still running (nothing is read).
        """
        infl, self._inflight = self._inflight, None
        seqs = infl.seqs
        live = [s.status == RUNNING for s in seqs]
        if not any(live):
            return None  # its K/V writes precede any later use of the freed blocks (one stream)
        if infl.ahead and self.model.weights_version != self._weights_version:
            # Parameter tensors were replaced after this step was launched (on the old ones):
            # drop it and run the step again on a runner built for the new tensors.
            self.runner = graphs.graph_runner(self.model, self._graph_batch)
            self._weights_version = self.model.weights_version
            seqs = [s for s, ok in zip(seqs, live) if ok]
            return self._decode_static(seqs, self._ids_array(seqs), appended=True)
        B = len(seqs)
        ahead = self._launch_ahead(infl) if all(live) else None
        tokens, status = self._out_slots[infl.slot].read(B)
        if ahead is not None:
            launch, new_blocks = ahead
            self._append_ahead(seqs, tokens, status, new_blocks)
            self._inflight = _InFlight(launch, 1 - infl.slot, list(seqs), ahead=True)
        if not all(live):
            keep = [i for i, ok in enumerate(live) if ok]
            seqs = [seqs[i] for i in keep]
            tokens, status = [tokens[i] for i in keep], [status[i] for i in keep]
        return self._commit(list(seqs), tokens, status, None, None)

    def _launch_ahead(self, infl: "_InFlight"):
        """Launch the step after `infl` when every row can take it without the host; returns
        (launch id, new blocks) or None."""
        seqs, runner, B = infl.seqs, self.runner, len(infl.seqs)
        if (self.steps_in_flight < 2 or self._num_waiting or self.running != seqs or self.keep_scores
                or self._penalty or not runner.can_continue(B, infl.launch)):
            return None
        # the step in flight draws token index num_generated; the next one draws index + 1
        gen = np.fromiter((s.num_generated for s in seqs), dtype=np.int64, count=B)
        if any(g + 2 > s.params.max_new_tokens for g, s in zip(gen.tolist(), seqs)):
            return None  # a row ends with the step in flight: the batch changes
        if self._min_new is not None and bool((gen + 1 < self._min_new).any()):
            return None  # EOS still masked: the logits processors need the host
        # NOTE: the next step's input goes at position len(tokens); a row entering a new block
        # names it now, before the token is known: the block the manager's next append takes.
        bs = self.block_size
        cross = [(i, len(s.tokens)) for i, s in enumerate(seqs) if len(s.tokens) % bs == 0]
        new_blocks = []
        if cross:
            heads = np.empty(len(cross), dtype=np.int32)
            if self.manager.next_free_blocks(heads) < len(cross):
                return None  # not enough free blocks: the next step may need to preempt
            new_blocks = [(i, p // bs, int(b)) for (i, p), b in zip(cross, heads.tolist())]
        launch = runner.launch_next(B, new_blocks, infl.launch, self._out_slots[1 - infl.slot])
        self.num_steps_ahead += 1
        return launch, new_blocks

    def _append_ahead(self, seqs: list[Sequence], tokens: list[int], status: list[int], new_blocks) -> None:
        """Give the block manager the tokens the step launched ahead is consuming (its K/V is being
        written), every row, ended ones included; check that it put them where the step did."""
        B = len(seqs)
        # a flagged row's step runs on token 0 (see ops.decode_inputs_): append what it computed
        toks = np.fromiter((t if st == 0 else 0 for t, st in zip(tokens, status)), dtype=np.int64, count=B)
        slots = np.empty(B, dtype=np.int64)
        cow = np.empty((B, 2), dtype=np.int64)
        n_cow = self.manager.append_tokens(self._ids_array(seqs), toks, slots, cow)
        bs = self.block_size
        if n_cow != 0 or any(slots[i] != b * bs for i, _, b in new_blocks):
            raise RuntimeError(f"the block manager placed the tokens of a step launched ahead elsewhere "
                               f"than the step wrote them (copies {n_cow}, slots {slots.tolist()}, "
                               f"named blocks {new_blocks}); this is a bug in the engine")
        for s in seqs:
            s.in_cache = len(s.tokens) + 1  # the token committed next is in the cache (being written)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
        seq.status, seq.in_cache = WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._num_waiting += 1

    # ------------------------------------------------------------------ sampling
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """Apply the logits processors, draw one token per sequence, update the sequences."""
        raw = logits.clone() if self.keep_scores else None
        scores = _process_logits(logits, seqs)
        dev = scores.device
        temperature = torch.tensor([s.params.temperature if s.params.do_sample else 0.0 for s in seqs],
                                   dtype=torch.float32, device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.int32, device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev)
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev)
        offsets = torch.tensor([s.num_generated for s in seqs], dtype=torch.int64, device=dev)
        warped = None
        if any(s.params.warps_eagerly for s in seqs):
            # min_p and typical_p come after top-p in HF's order: the whole chain runs here and
            # the sampler draws from the filtered scores with its own filters off.
            warped = _warp(scores, seqs, temperature, top_k, top_p)
            scores, temperature = warped, (temperature > 0).float()
            top_k, top_p = torch.zeros_like(top_k), torch.ones_like(top_p)
        tokens, status = ops.sample(scores, temperature, top_k, top_p, seeds, offsets)
        tokens, status = tokens.tolist(), status.tolist()
        if self.keep_scores and warped is None:
            warped = ops.sampling.filter_logits_ref(scores, temperature, top_k, top_p)
        return self._commit(seqs, tokens, status, raw, warped if self.keep_scores else None)

    def _commit(self, seqs: list[Sequence], tokens: list[int], status: list[int],
                raw: torch.Tensor | None, warped: torch.Tensor | None) -> list[StepOutput]:
        """Append the drawn tokens, finish sequences that ended, free their blocks."""
        outs, error, done = [], None, []
        for i, s in enumerate(seqs):
            if status[i] != 0:
                # Finish it (no token) and raise once every other row is consistent.
                error = error or NonFiniteLogitsError(s.seq_id, s.num_generated, status[i])
                self._finish(s, "error")
                done.append(s)
                continue
            tok = tokens[i]
            index = s.num_generated
            s.tokens.append(tok)
            s.num_generated = index + 1
            params = s.params
            finished = True
            if tok in params.eos_token_ids:
                self._finish(s, "eos")
            elif index + 1 >= params.max_new_tokens:
                self._finish(s, "length")
            else:
                finished = False
            if finished:
                done.append(s)
            outs.append(StepOutput(s.seq_id, tok, index, finished,
                                   raw[i] if raw is not None else None,
                                   warped[i] if warped is not None else None))
        if done:
            for s in done:
                self.manager.free(s.seq_id)
            self.running = [s for s in self.running if s.status != FINISHED]
        if error is not None:
            self._pending.extend(outs)  # the other rows' tokens: returned by the next step()
            raise error
        return outs

    # ------------------------------------------------------------------ helpers
    def _ids_array(self, seqs: list[Sequence]) -> np.ndarray:
        return np.fromiter((s.seq_id for s in seqs), dtype=np.int64, count=len(seqs))

    def _block_tables(self, ids: np.ndarray, longest: int) -> torch.Tensor:
        # NOTE: the width is the longest table in this batch, so the CPU references never gather
        # more K/V than the longest sequence holds.
        tables = np.empty((len(ids), -(-longest // self.block_size)), dtype=np.int32)
        self.manager.block_tables(ids, tables)
        return self._to_device(tables)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)


def _process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """HF's logits processors, in place on fp32 (B, V) logits, in HF's order: the repetition
    penalty, n-gram bans, bad words, end-of-sequence masking until min_new_tokens, suppressed
    tokens, tokens suppressed at the first step."""
    penalized = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if penalized:
        width = max(len(seqs[i].tokens) for i in penalized)
        idx = np.empty((len(penalized), width), dtype=np.int64)
        for r, i in enumerate(penalized):
            toks = seqs[i].tokens
            idx[r, :len(toks)] = toks
            idx[r, len(toks):] = toks[0]  # repeats are harmless: the same value is written
        rows = torch.tensor(penalized, device=logits.device)
        idx_t = torch.from_numpy(idx).to(logits.device)
        penalty = torch.tensor([seqs[i].params.repetition_penalty for i in penalized],
                               dtype=logits.dtype, device=logits.device).unsqueeze(1)
        sub = logits.index_select(0, rows)
        picked = sub.gather(1, idx_t)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        logits.index_copy_(0, rows, sub.scatter(1, idx_t, picked))
    V = logits.shape[1]
    for i, s in enumerate(seqs):
        p = s.params
        banned: list = []
        if p.no_repeat_ngram_size:
            banned.extend(processors.no_repeat_ngram_bans(s.tokens, p.no_repeat_ngram_size).tolist())
        if p.bad_words_ids:
            banned.extend(processors.bad_words_bans(s.tokens, p.bad_words_ids))
        if s.num_generated < p.min_new_tokens and p.eos_token_ids:
            banned.extend(p.eos_token_ids)
        banned.extend(p.suppress_tokens)
        if s.num_generated == 0:
            banned.extend(p.begin_suppress_tokens)
        if banned:
            # ids past the logits' width cannot be generated: nothing to mask (as in HF)
            logits[i, [t for t in banned if t < V]] = float("-inf")
    return logits


def weights_fingerprint(module) -> tuple | None:
    """Changes whenever a parameter of `module` is replaced, moved, cast or modified in place
    (PyTorch's version counter); None when it cannot be read (inference tensors keep no version)."""
    try:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())
    except RuntimeError:
        return None


def _release_blocks(cache, seqs: dict[int, Sequence]) -> None:
    """An engine's finalizer: give the blocks of its running sequences back to the pool."""
    with cache.lock:
        for seq in seqs.values():
            if seq.status == RUNNING and cache.manager.has_sequence(seq.seq_id):
                cache.manager.free(seq.seq_id)
            seq.status = FINISHED


def _integer_like(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _token_list(prompt, vocab_size: int) -> list[int]:
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


def _seed_list(seeds) -> list[int]:
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


def _warp(scores: torch.Tensor, seqs: list[Sequence], temperature: torch.Tensor,
          top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF's sampling warpers, eagerly: temperature, top-k, top-p, then min_p and typical_p.

    Returns a new (B, V) fp32 tensor: the scores each row is drawn from (greedy rows unchanged).
    """
    x = ops.sampling.filter_logits_ref(scores, temperature, top_k, top_p)
    for name, fn in (("min_p", processors.min_p_), ("typical_p", processors.typical_)):
        off = 0.0 if name == "min_p" else 1.0
        rows = [i for i, s in enumerate(seqs) if s.params.do_sample and getattr(s.params, name) != off]
        if rows:
            idx = torch.tensor(rows, device=x.device)
            value = torch.tensor([getattr(seqs[i].params, name) for i in rows], device=x.device)
            x.index_copy_(0, idx, fn(x.index_select(0, idx), value))
    return x


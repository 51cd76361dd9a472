"""The engine: continuous batching over the paged KV cache, as a short orchestrator.

Each `step()` is a prefill of newly admitted sequences (all their uncached prompt tokens as one
flattened batch, no padding) or a decode step (one token for every running sequence), made of
the same stages, each in its own module:

    scheduler.admit / schedule_decode   which sequences run; their KV blocks and slots
    batch.build_prefill / build_decode  the step's typed hand-off (`PrefillBatch`, `DecodeBatch`)
    model.forward_paged, or graphs      the logits; a decode step may run as the model's CUDA
      (runner.load + launch / run)        graph instead, which samples on the device
    sampler.sample                      logits processors, then one draw per row (`Draw`)
    scheduler.commit                    append the tokens, finish the sequences that ended

Sequences are admitted while the block manager has room; when a decode step needs more blocks
than are free, the newest running sequence is preempted: its blocks are freed and it waits to be
recomputed from its prompt and the tokens it already produced (prefix caching usually makes that
cheap). Sampling randomness is keyed by each sequence's seed and the index of the token being
drawn, never by the schedule, and no value of another sequence enters a sequence's computation:
preemption and batch composition change its logits only by floating-point rounding (a matmul
over another batch size may sum in another order), which can move a token only at a near-tie.

The engine knows nothing of HF argument names: `generation` translates them into `SamplingParams`.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import graphs, ops
from .batch import SamplingRows, build_decode, build_prefill, newest_tokens
from .sampler import Draw, sample
from .scheduler import Scheduler, release_blocks
from .sequence import (
    NonFiniteLogitsError,
    SampleStatus,
    SamplingParams,
    Sequence,
    SequenceStatus,
    StepOutput,
    check_prompt,
    check_seeds,
)
from .settings import RuntimeOptions

__all__ = ["Engine", "NonFiniteLogitsError", "SamplingParams", "Sequence", "StepOutput", "weights_fingerprint"]

RUNNING = SequenceStatus.RUNNING


@dataclass(slots=True)
class _InFlight:
    """A graph decode step launched but not read yet: its launch id, the engine's output slot it
    lands in, its rows (in batch order), and whether it was launched ahead (before the previous
    step's tokens were read, by an earlier `step()` call)."""

    launch: int
    slot: int
    seqs: list[Sequence]
    ahead: bool


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
        `GPTFAST_CUDA_GRAPHS` (0 or 1) when the engine is built, else on for CUDA models unless
        the kernels are the references. True on the CPU runs the
        runner's static-buffer step eagerly (there is nothing to capture); the tests use it to
        check that path.
    kernels : str or None
        The ops' backend for this engine's steps: "auto" (CUDA tensors to the Triton kernels,
        CPU tensors to the references), "triton" or "reference". None: the environment's
        `GPTFAST_KERNELS` when the engine is built, else "auto".
    gemv_decode : bool or None
        Decode steps of 1-8 rows on the kernel path take the fused GEMV ops (None or True) or
        the unfused ones, cuBLAS GEMMs with fused epilogues (False: the benchmarks' baseline for
        the GEMV path). An engine with False gets a graph runner of its own op set.
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
                 keep_scores: bool = False, cuda_graphs: bool | None = None, steps_in_flight: int = 2,
                 kernels: str | None = None, gemv_decode: bool | None = None):
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        if steps_in_flight not in (1, 2) or isinstance(steps_in_flight, bool):
            raise ValueError(f"steps_in_flight must be 1 or 2, got {steps_in_flight!r}")
        self.options = RuntimeOptions.with_defaults(kernels=kernels, cuda_graphs=cuda_graphs, gemv_decode=gemv_decode)
        self.model = model
        self.cache = model.kv_cache
        self.manager = self.cache.manager
        self.device = model.device
        self.max_num_seqs = max_num_seqs
        self.steps_in_flight = steps_in_flight
        self.keep_scores = keep_scores
        if max_prefill_tokens is None:
            n = model.config.n_positions
            max_prefill_tokens = 8 * n if self.device.type == "cuda" else max(2048, n)
        self.max_prefill_tokens = max_prefill_tokens
        # The decode runner is the model's (`graphs.graph_runner`: captured once per model and
        # shared by its engines); the engine holds it, and asks for it again when it is stale.
        self._graph_batch = min(max_num_seqs, graphs.MAX_BATCH)
        use_graphs = self.options.use_graphs(self.device.type)
        with self.cache.lock, ops.backend(self.options.kernels, self.options.gemv_decode):
            self.runner = graphs.graph_runner(model, self._graph_batch) if use_graphs else None
        self._weights_version = model.weights_version
        self._inflight: _InFlight | None = None  # a graph step whose tokens are not read yet
        self._out_slots: list = []  # the runner's host output slots this engine alternates
        self._sampling_rows: SamplingRows | None = None  # of the last graph decode step's batch
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_prefill_tokens)
        # Outputs produced but not yet handed out (a stream closed mid-step, a step that raised
        # NonFiniteLogitsError for another row): the next step() or stream() returns them first.
        self._pending: collections.deque[StepOutput] = collections.deque()
        # Counters for tests and benchmarks.
        self.num_prefill_tokens = 0  # tokens computed by prefill steps (cache hits excluded)
        self.num_steps = 0
        self.num_steps_ahead = 0  # decode steps launched before the previous one's tokens were read
        with self.cache.lock:
            self.cache.engines.add(self.scheduler)
            if self.cache.weights_fingerprint is None and self.manager.num_cached_blocks() == 0:
                # Nothing cached yet: whatever is cached from now on comes from these weights.
                self.cache.weights_fingerprint = weights_fingerprint(model)
        # NOTE: the finalizer holds the cache and the sequence table, never the engine, so an
        # engine dropped without abort() is collected and its blocks go back to the pool.
        weakref.finalize(self, release_blocks, self.cache, self.scheduler.seqs)

    @property
    def num_preemptions(self) -> int:
        """Sequences of this engine preempted so far."""
        return self.scheduler.num_preemptions

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
        prompt = check_prompt(prompt, config.vocab_size)
        seeds = check_seeds(seeds)
        bad_eos = [e for e in params.eos_token_ids if e >= config.vocab_size]
        if bad_eos:
            raise ValueError(f"params.eos_token_ids holds {bad_eos[0]}, outside the vocabulary "
                             f"[0, {config.vocab_size})")
        if len(prompt) + params.max_new_tokens > config.n_positions:
            raise ValueError(f"{len(prompt)} prompt + {params.max_new_tokens} new tokens exceed the "
                             f"model's n_positions ({config.n_positions})")
        # The last generated token is never fed back, so its K/V needs no slot.
        bs = self.cache.block_size
        need = -(-(len(prompt) + params.max_new_tokens - 1) // bs)
        if need > self.manager.total_blocks:
            raise ValueError(
                f"a sequence of {len(prompt)} prompt + {params.max_new_tokens} new tokens needs "
                f"{need} KV blocks of {bs} tokens, but the pool has only "
                f"{self.manager.total_blocks}; load the model with a larger num_kv_blocks")
        return self.scheduler.enqueue(prompt, params, seeds)

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence now (finish reason "stop") and release its blocks, in O(1) for a
        waiting sequence. Cancelling a sequence that already finished does nothing.

        Raises
        ------
        KeyError if this engine never issued `seq_id`.
        """
        with self.cache.lock:
            seq = self.scheduler.seqs.get(seq_id)
            if seq is not None:
                self.scheduler.cancel(seq)
            elif not self.scheduler.was_issued(seq_id):
                raise KeyError(f"cancel(): sequence id {seq_id!r} was never issued by this Engine")

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
        from .beam import beam_search, check_beam_request

        check_beam_request(self.model.config, prompts, params, num_beams, num_return, early_stopping)
        eos = params.eos_token_ids
        return beam_search(self.model, [list(p) for p in prompts], params, num_beams=num_beams,
                           num_return=num_return, length_penalty=float(length_penalty),
                           early_stopping=early_stopping, fill=eos[0] if eos else -1,
                           seed=seed, kernels=self.options.kernels, cuda_graphs=self.runner is not None,
                           gemv_decode=self.options.gemv_decode)

    def has_unfinished(self) -> bool:
        """Whether any sequence is still waiting or running, or outputs are still to be returned."""
        return bool(self.scheduler.num_waiting or self.scheduler.running or self._pending)

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
            self.scheduler.abort()
            self._pending.clear()
            self._inflight = None  # a step still on the device writes only the slots just freed

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
        with self.cache.lock, ops.backend(self.options.kernels, self.options.gemv_decode):
            self.num_steps += 1
            if self.model._kv_cache is not self.cache:
                raise RuntimeError("the model was moved or cast while this Engine was using it (its "
                                   "KV cache was replaced); create a new Engine")
            try:
                if self._inflight is not None:
                    outs = self._complete_inflight()
                    if outs is not None:
                        return outs
                admitted = self.scheduler.admit(self._weights_unchanged)
                if admitted:
                    return self._prefill(admitted)
                if self.scheduler.running:
                    return self._decode()
            except NonFiniteLogitsError:
                raise
            except BaseException:
                self._inflight = None  # its rows are recomputed (a step on the device writes only their old slots)
                self.scheduler.roll_back()
                raise
            if self.scheduler.num_waiting:
                raise RuntimeError(self.scheduler.pool_report("the next waiting sequence does not fit even "
                                                              "with nothing else running"))
            return []

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        batch = build_prefill(self.manager, seqs)
        self.num_prefill_tokens += batch.num_tokens
        logits = self.model.forward_paged(*batch.model_inputs(self.device), cache=self.cache)  # (B, V) fp32
        for s in seqs:
            s.num_cached_tokens = len(s.tokens)
        # Fork children share the prompt's blocks and draw their first token from its logits.
        drawing, rows = self.scheduler.start_forks(seqs)
        if len(rows) != len(seqs):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        return self._commit(drawing, sample(drawing, logits, self.keep_scores))

    def _decode(self) -> list[StepOutput]:
        seqs, ids = self.scheduler.schedule_decode()
        if self.runner is not None and len(seqs) <= self.runner.max_batch:
            if self.model.weights_version != self._weights_version:
                # parameter tensors may have been replaced: the graphs hold the old addresses
                self.runner = graphs.graph_runner(self.model, self._graph_batch)
                self._weights_version = self.model.weights_version
            return self._decode_graph(seqs, ids)
        batch = self._decode_batch(seqs, ids, appended=False, graph=False)
        logits = self.model.forward_paged(*batch.model_inputs(self.device), cache=self.cache)  # (B, V) fp32
        return self._commit(seqs, sample(seqs, logits, self.keep_scores))

    def _decode_batch(self, seqs: list[Sequence], ids: np.ndarray, appended: bool, graph: bool):
        """The decode batch of `seqs`, their newest tokens given slots (unless `appended`: the
        manager holds them already). A graph step's batch carries the rows' sampling constants,
        rebuilt only when the batch composition changed."""
        tokens = newest_tokens(seqs)
        slots = None if appended else self.scheduler.append_slots(ids, tokens)
        rows = None
        if graph:
            if self._sampling_rows is None or self._sampling_rows.seqs != seqs:
                self._sampling_rows = SamplingRows.of(seqs)
            rows = self._sampling_rows
        batch = build_decode(self.manager, seqs, ids, tokens, slots, rows)
        for s in seqs:
            s.num_cached_tokens = len(s.tokens)
        return batch

    def _commit(self, seqs: list[Sequence], draw: Draw) -> list[StepOutput]:
        outs, error = self.scheduler.commit(seqs, draw)
        if error is not None:
            self._pending.extend(outs)  # the other rows' tokens: returned by the next step()
            raise error
        return outs

    def _weights_unchanged(self) -> bool:
        """Whether the cached prefixes were computed from the model's current weights; if not,
        they are dropped and the current weights recorded."""
        return self.cache.check_weights(weights_fingerprint(self.model))

    # ------------------------------------------------------------------ decode steps as graphs
    def _decode_graph(self, seqs: list[Sequence], ids: np.ndarray, appended: bool = False) -> list[StepOutput]:
        """The decode step through the graph runner: it loads the batch into its static buffers
        and replays its graph. `appended`: the manager already holds every row's newest token (a
        step launched ahead was dropped); the step derives its slots from the block tables."""
        batch = self._decode_batch(seqs, ids, appended, graph=True)
        runner, B = self.runner, len(seqs)
        runner.load(batch)
        if self.keep_scores or batch.needs_logits:
            # The logits processors (and score outputs) see the logits before the draw: the
            # graph stops at the logits and the sampler runs eagerly.
            return self._commit(seqs, sample(seqs, runner.run(B, sample=False), self.keep_scores))
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
            return self._decode_graph(seqs, Scheduler.ids(seqs), appended=True)
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
        return self._commit(list(seqs), Draw(tokens, status))

    def _launch_ahead(self, infl: _InFlight):
        """Launch the step after `infl` when every row can take it without the host; returns
        (launch id, new blocks) or None."""
        seqs, runner, B = infl.seqs, self.runner, len(infl.seqs)
        rows = self._sampling_rows  # NOTE: made for `seqs` by the step that launched `infl`
        if (self.steps_in_flight < 2 or self.scheduler.num_waiting or self.scheduler.running != seqs
                or self.keep_scores or rows.eager_processing or not runner.can_continue(B, infl.launch)):
            return None
        # the step in flight draws token index num_generated; the next one draws index + 1
        gen = np.fromiter((s.num_generated for s in seqs), dtype=np.int64, count=B)
        if any(g + 2 > s.params.max_new_tokens for g, s in zip(gen.tolist(), seqs)):
            return None  # a row ends with the step in flight: the batch changes
        if rows.eos_masked(gen + 1):
            return None  # EOS still masked: the logits processors need the host
        # NOTE: the next step's input goes at position len(tokens); a row entering a new block
        # names it now, before the token is known: the block the manager's next append takes.
        bs = self.cache.block_size
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
        toks = np.fromiter((t if st == SampleStatus.OK else 0 for t, st in zip(tokens, status)), dtype=np.int64,
                           count=B)
        slots = np.empty(B, dtype=np.int64)
        cow = np.empty((B, 2), dtype=np.int64)
        n_cow = self.manager.append_tokens(Scheduler.ids(seqs), toks, slots, cow)
        bs = self.cache.block_size
        if n_cow != 0 or any(slots[i] != b * bs for i, _, b in new_blocks):
            raise RuntimeError(f"the block manager placed the tokens of a step launched ahead elsewhere "
                               f"than the step wrote them (copies {n_cow}, slots {slots.tolist()}, "
                               f"named blocks {new_blocks}); this is a bug in the engine")
        for s in seqs:
            s.num_cached_tokens = len(s.tokens) + 1  # the token committed next is in the cache (being written)


def weights_fingerprint(module) -> tuple | None:
    """Changes whenever a parameter of `module` is replaced, moved, cast or modified in place
    (PyTorch's version counter); None when it cannot be read (inference tensors keep no version)."""
    try:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())
    except RuntimeError:
        return None

"""The scheduler: which sequences run, and their KV blocks.

One `Scheduler` per engine holds its sequences (`waiting`, `running`, `seqs`) and every change
of their state and of their blocks in the model's block manager:

- `enqueue` queues a request (the sequences of one prompt: the first is prefilled, the others
  fork from it afterwards, sharing the prompt's blocks);
- `admit` moves waiting sequences to running while the pool has blocks for their prompts and the
  prefill budget lasts (the prefix cache supplies what it already holds);
- `schedule_decode` preempts the newest running sequence, of any engine on the model (never this
  engine's last one), until every running sequence has a slot for its next token, and
  `append_slots` gives them those slots (copying a shared partial block on write);
- `commit` appends the tokens a step drew, finishes the sequences that ended and frees their
  blocks; `cancel`, `roll_back` and `abort` are the other ways out.

A preempted sequence frees its blocks and waits, at the head of the queue, to be recomputed from
its prompt and the tokens it already produced.
"""

from __future__ import annotations

import bisect
import collections
import numbers
from collections.abc import Callable

import numpy as np
import torch

from .sampler import Draw
from .sequence import (
    FinishReason,
    NonFiniteLogitsError,
    SampleStatus,
    SamplingParams,
    Sequence,
    SequenceStatus,
    StepOutput,
)

WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED


class Scheduler:
    """An engine's sequences and their blocks in the model's KV cache (see the module docstring).

    Parameters
    ----------
    cache : gptfast.kv_cache.KVCache
        The model's cache; every method but `enqueue` expects its lock to be held by the caller.
    max_num_seqs : int
        Most running sequences.
    max_prefill_tokens : int
        Most uncached prompt tokens admitted for one prefill step (one prompt is always admitted).

    Attributes
    ----------
    waiting : deque of Sequence
        Sequences to prefill, oldest first; cancelled ones stay (finished) until they reach the
        head, so that a cancel is O(1); `num_waiting` counts the live ones.
    running : list of Sequence
        Sequences holding blocks, in admission order.
    seqs : dict of int to Sequence
        Every unfinished sequence, by id.
    num_preemptions : int
        Sequences of this scheduler preempted so far.
    """

    def __init__(self, cache, max_num_seqs: int, max_prefill_tokens: int):
        self.cache = cache
        self.manager = cache.manager
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.num_waiting = 0
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self._issued: list[list[int]] = []  # [start, end) ranges of the ids issued here

    # ------------------------------------------------------------------ requests
    def enqueue(self, prompt: list[int], params: SamplingParams, seeds: list[int]) -> list[int]:
        """Queue one sequence per seed continuing `prompt` (checked by the caller); their ids."""
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
            self.num_waiting += 1
            if self._issued and self._issued[-1][1] == ids.start:
                self._issued[-1][1] = ids.stop
            else:
                self._issued.append([ids.start, ids.stop])
        return list(ids)

    def was_issued(self, seq_id) -> bool:
        """Whether `seq_id` was issued by `enqueue` (finished or not)."""
        if not isinstance(seq_id, numbers.Integral) or isinstance(seq_id, bool):
            return False
        i = bisect.bisect_right(self._issued, [seq_id, float("inf")]) - 1
        return i >= 0 and self._issued[i][0] <= seq_id < self._issued[i][1]

    def cancel(self, seq: Sequence) -> None:
        """Finish `seq` (reason STOP) and free its blocks; O(1) for a waiting sequence."""
        if seq.status == RUNNING:
            self.running.remove(seq)
            self.manager.free(seq.seq_id)
        elif seq.fork_parent is not None:  # a fork child not started yet
            seq.fork_parent.fork_children.remove(seq)
            seq.fork_parent = None
        else:
            # Left in the queue, finished: the admission skips it. Its fork children were
            # never started: they continue as plain waiting sequences.
            self.num_waiting += len(seq.fork_children) - 1
            for child in reversed(seq.fork_children):
                child.fork_parent = None
                self.waiting.appendleft(child)
            seq.fork_children = []
        self.finish(seq, FinishReason.STOP)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason = FINISHED, reason
        self.seqs.pop(seq.seq_id, None)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the head of the queue to be recomputed."""
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
        seq.status, seq.num_cached_tokens = WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_waiting += 1

    # ------------------------------------------------------------------ prefill
    def admit(self, prefix_cache_valid: Callable[[], bool]) -> list[Sequence]:
        """Move waiting sequences to running while their prompts fit; the ones admitted, each
        with `num_cached_tokens` set to the prompt tokens the prefix cache already holds.

        `prefix_cache_valid()` is called before the first prefix-cache hit: whether the cached K/V
        were computed from the model's current weights (if not, it has dropped them).
        """
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
                if not prefix_cache_valid():
                    self.manager.free(seq.seq_id)
                    cached = self.manager.allocate_prompt(seq.seq_id, tokens)
            if cached < 0:
                if self.running or admitted:
                    break  # not enough free blocks: wait for running sequences to finish
                # Nothing of this engine runs: take the blocks of other engines' newest sequences.
                victim = self.newest_victim(own_too=False)
                if victim is None:
                    break
                victim[0].preempt(victim[1])
                continue
            self.waiting.popleft()
            self.num_waiting -= 1
            seq.num_cached_tokens = cached
            seq.status = RUNNING
            # NOTE: running from the moment it holds blocks, so an error before its prefill
            # completes frees them (see roll_back).
            self.running.append(seq)
            admitted.append(seq)
            budget -= len(seq.tokens) - cached
        return admitted

    def start_forks(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """After the prefill of `seqs`: their fork children take the prompt's blocks and run.

        Returns every sequence that draws a token from the prefill's logits, and for each the row
        of `seqs` (the logits row) it draws from.
        """
        batch, rows = [], []
        for i, s in enumerate(seqs):
            batch.append(s)
            rows.append(i)
            for child in s.fork_children:
                self.manager.fork(s.seq_id, child.seq_id)
                child.num_cached_tokens, child.status, child.fork_parent = s.num_cached_tokens, RUNNING, None
                self.running.append(child)
                batch.append(child)
                rows.append(i)
            s.fork_children = []
        return batch, rows

    # ------------------------------------------------------------------ decode
    def schedule_decode(self) -> tuple[list[Sequence], np.ndarray]:
        """Preempt the newest running sequences until the next token of every running sequence
        of this scheduler has a slot; the sequences of the decode step and their ids [B] int64."""
        ids = self.ids(self.running)
        while self.manager.blocks_needed_for_append(ids) > self.manager.num_free_blocks():
            victim = self.newest_victim(own_too=len(self.running) > 1)
            if victim is None:
                break  # append_slots reports what holds the pool
            victim[0].preempt(victim[1])
            if victim[0] is self:
                ids = self.ids(self.running)
        return list(self.running), ids

    def append_slots(self, seq_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Give each sequence a slot for its newest token (`tokens[i]`), copying a shared partial
        block on write; the slots, [B] int64."""
        slots = np.empty(len(seq_ids), dtype=np.int64)
        cow = np.empty((len(seq_ids), 2), dtype=np.int64)
        n_cow = self.manager.append_tokens(seq_ids, tokens, slots, cow)
        if n_cow < 0:
            raise RuntimeError(self.pool_report("no block is left for the next token of this "
                                                "engine's only running sequence"))
        if n_cow:
            self.cache.copy_blocks(torch.from_numpy(cow[:n_cow]))
        return slots

    @staticmethod
    def ids(seqs: list[Sequence]) -> np.ndarray:
        """The sequences' ids, [B] int64."""
        return np.fromiter((s.seq_id for s in seqs), dtype=np.int64, count=len(seqs))

    # ------------------------------------------------------------------ commit
    def commit(self, seqs: list[Sequence], draw: Draw) -> tuple[list[StepOutput], NonFiniteLogitsError | None]:
        """Append the drawn tokens (row i is `seqs[i]`'s), finish the sequences that ended and free
        their blocks. Returns the outputs and, when a row drew no token, the error to raise once
        the others are handed out (that row is finished, reason ERROR)."""
        outs, error, done = [], None, []
        tokens, status, raw, scores = draw.tokens, draw.status, draw.logits, draw.scores
        for i, s in enumerate(seqs):
            if status[i] != SampleStatus.OK:
                error = error or NonFiniteLogitsError(s.seq_id, s.num_generated, status[i])
                self.finish(s, FinishReason.ERROR)
                done.append(s)
                continue
            tok = tokens[i]
            index = s.num_generated
            s.tokens.append(tok)
            s.num_generated = index + 1
            params = s.params
            finished = True
            if tok in params.eos_token_ids:
                self.finish(s, FinishReason.EOS)
            elif index + 1 >= params.max_new_tokens:
                self.finish(s, FinishReason.LENGTH)
            else:
                finished = False
            if finished:
                done.append(s)
            outs.append(StepOutput(s.seq_id, tok, index, finished,
                                   raw[i] if raw is not None else None,
                                   scores[i] if scores is not None else None))
        if done:
            for s in done:
                self.manager.free(s.seq_id)
            self.running = [s for s in self.running if s.status != FINISHED]
        return outs, error

    # ------------------------------------------------------------------ failures
    def roll_back(self) -> None:
        """After a step failed midway: every running sequence waits to be recomputed, and no
        prefix hash of a block whose K/V may be unwritten survives."""
        for seq in sorted(self.running, key=lambda s: (s.arrival, s.seq_id), reverse=True):
            self.preempt(seq)
        self.manager.reset_prefix_cache()

    def abort(self) -> None:
        """Drop every sequence and free their blocks."""
        for seq in self.running:
            self.manager.free(seq.seq_id)
        for seq in self.seqs.values():
            seq.status = FINISHED
        self.running.clear()
        self.waiting.clear()
        self.num_waiting = 0
        self.seqs.clear()

    def newest_victim(self, own_too: bool) -> tuple[Scheduler, Sequence] | None:
        """The newest running sequence of the schedulers on this model (this one's only when
        `own_too`), with its scheduler: the one to preempt when blocks run short."""
        best = None
        for sched in list(self.cache.engines):
            if sched is self and not own_too:
                continue
            for s in sched.running:
                if best is None or (s.arrival, s.seq_id) > (best[1].arrival, best[1].seq_id):
                    best = (sched, s)
        return best

    def pool_report(self, what: str) -> str:
        """An error message saying who holds the pool's blocks."""
        m = self.manager
        ours = len(self.running)
        others = sum(len(s.running) for s in list(self.cache.engines) if s is not self)
        orphans = m.num_sequences() - ours - others
        return (f"{what}: the KV-cache pool has {m.total_blocks} blocks, {m.num_free_blocks()} free; "
                f"{ours} sequences of this engine, {others} of other engines on the model and "
                f"{orphans} held outside any live Engine hold the rest")


def release_blocks(cache, seqs: dict[int, Sequence]) -> None:
    """An engine's finalizer: give the blocks of its running sequences back to the pool."""
    with cache.lock:
        for seq in seqs.values():
            if seq.status == RUNNING and cache.manager.has_sequence(seq.seq_id):
                cache.manager.free(seq.seq_id)
            seq.status = FINISHED

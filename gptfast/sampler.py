"""Logits processing and the draw: from a step's logits to one token (or a status) per row.

    logits (B, V) fp32 --process_logits--> scores --[warp, if a row needs min_p/typical_p]-->
    ops.sample(scores, temperature, top_k, top_p, seeds, offsets) --> Draw(tokens, status)

The logits processors (repetition penalty, n-gram and bad-word bans, the min-length EOS mask,
suppressed tokens) run eagerly on the logits, in HF's order. Temperature, top-k and top-p are
fused into the sampling kernel; min_p and typical_p come after top-p in HF's order, so a batch
with such a row runs the whole warper chain eagerly (`warp`) and the kernel draws from the warped
scores with its own filters off. Each row draws with its sequence's seed at the index of the token
being drawn (Philox key and offset), never with anything that depends on the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import ops, processors
from .sequence import Sequence


@dataclass(slots=True)
class Draw:
    """What the sampler drew for a batch of B rows.

    tokens : B ints (-1 for a row whose status is not OK)
    status : B `SampleStatus` values as ints
    logits, scores : (B, V) fp32 raw logits and the processed (filtered) scores each row was
        drawn from, when kept (`keep_scores`), else None
    """

    tokens: list[int]
    status: list[int]
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def sample(seqs: list[Sequence], logits: torch.Tensor, keep_scores: bool = False) -> Draw:
    """Process `logits` (B, V) fp32 (in place) and draw one token per row; row i is `seqs[i]`'s.

    Greedy rows take the argmax (lowest id on ties); sampled rows draw from their filtered softmax.
    """
    raw = logits.clone() if keep_scores else None
    scores = process_logits(logits, seqs)
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
        warped = warp(scores, seqs, temperature, top_k, top_p)
        scores, temperature = warped, (temperature > 0).float()
        top_k, top_p = torch.zeros_like(top_k), torch.ones_like(top_p)
    tokens, status = ops.sample(scores, temperature, top_k, top_p, seeds, offsets)
    if keep_scores and warped is None:
        warped = ops.filter_logits(scores, temperature, top_k, top_p)
    return Draw(tokens.tolist(), status.tolist(), raw, warped if keep_scores else None)


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """HF's logits processors, in place on fp32 (B, V) logits, in HF's order: the repetition
    penalty, n-gram bans, bad words, end-of-sequence masking until min_new_tokens, suppressed
    tokens, tokens suppressed at the first step. Row i is `seqs[i]`'s; returns `logits`."""
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


def warp(scores: torch.Tensor, seqs: list[Sequence], temperature: torch.Tensor,
          top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF's sampling warpers, eagerly: temperature, top-k, top-p, then min_p and typical_p.

    Returns a new (B, V) fp32 tensor: the scores each row is drawn from (greedy rows unchanged).
    """
    x = ops.filter_logits(scores, temperature, top_k, top_p)
    for name, fn in (("min_p", processors.min_p_), ("typical_p", processors.typical_)):
        off = 0.0 if name == "min_p" else 1.0
        rows = [i for i, s in enumerate(seqs) if s.params.do_sample and getattr(s.params, name) != off]
        if rows:
            idx = torch.tensor(rows, device=x.device)
            value = torch.tensor([getattr(seqs[i].params, name) for i in rows], device=x.device)
            x.index_copy_(0, idx, fn(x.index_select(0, idx), value))
    return x

"""Beam search on the paged KV cache: HF's vectorised beam search, with beams as forks.

The search is Hugging Face's (transformers 5.24 `_beam_search`), step for step, on fp32
log-probabilities of shape (B, num_beams, V):

1. log_softmax of each running beam's logits, then the logits processors (repetition penalty,
   n-gram bans, bad words, min-length EOS mask, suppressed tokens) on the log-probabilities;
2. add each beam's running score and take the top K = max(2, 1 + #EOS) * num_beams
   continuations over all beams and tokens (enough that num_beams of them do not end);
3. a continuation ends if its token is an EOS id or the length limit is reached; the best
   num_beams continuations that do not end are the next running beams;
4. those among the first num_beams that end compete, scored by sum of log-probs divided by
   (generated length ** length_penalty), with the finished hypotheses kept so far; the best
   num_beams stay;
5. the search stops when no running beam can beat the worst finished hypothesis (the
   `early_stopping` heuristics: False judges by the current length, "never" by the longest
   possible one when length_penalty > 0, True stops once num_beams hypotheses finished), when
   every continuation ends, or at the length limit. Every batch item runs until all are done,
   as in HF, so `scores` has the same rows.

The K/V of the beams is not copied or reordered (HF re-indexes a dense cache of
B * num_beams full-length rows every step). Each running beam is a sequence of the block
manager; choosing the next beams keeps a parent's sequence for its first child, forks it for
the others (the child shares every block, the last partial one included) and frees parents
that no beam continues. The next step's append copies a shared partial block on write, so
beams share their prompt and every full block of their common history.

Each decode step of the beams replays the model's decode graph that stops at the logits
(`gptfast.graphs`, when the engine would use graphs: CUDA with the Triton kernels, or
cuda_graphs=True / GPTFAST_CUDA_GRAPHS=1), loaded with the step's `DecodeBatch`. The beam choice
runs eagerly after it, on the device (log-softmax, processors, a top-k over num_beams * V per
prompt); only the chosen parents and tokens come to the host,
where the forks and frees happen (one sync per step: the next step's block tables depend on
the choice). Batches above the largest graph bucket run the paged forward eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from . import graphs, ops, processors
from .batch import DecodeBatch, PrefillBatch, block_tables
from .engine import weights_fingerprint
from .sampler import process_logits
from .sequence import SamplingParams, Sequence
from .settings import RuntimeOptions

_NEG = -1.0e9  # HF's "never chosen" score offset


class BeamResult:
    """What one beam search returns.

    sequences : LongTensor (B * num_return, new) generated tokens, padded with `fill`
    sequences_scores : fp32 (B * num_return,) length-penalised scores of the returned hypotheses
    beam_indices : int32 (B * num_return, new) the beam row each token came from, -1 after
    scores, logits : lists of (B * num_beams, V) fp32 tensors per step (on the model's
        device), or None
    peak_blocks : most KV blocks the search held at once
    """

    def __init__(self, sequences, sequences_scores, beam_indices, scores, logits, peak_blocks):
        self.sequences = sequences
        self.sequences_scores = sequences_scores
        self.beam_indices = beam_indices
        self.scores = scores
        self.logits = logits
        self.peak_blocks = peak_blocks


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b, j], ...] for a (B, n, ...) tensor and (B, k) indices."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], params: SamplingParams, *, num_beams: int,
                num_return: int, length_penalty: float, early_stopping, fill: int,
                want_scores: bool = False, want_logits: bool = False,
                seed: int | None = None, kernels: str | None = None,
                cuda_graphs: bool | None = None, gemv_decode: bool | None = None) -> BeamResult:
    """Run HF's beam search over the model's paged cache.

    Parameters
    ----------
    model : gptfast.GPT2
    prompts : B lists of token ids (each row's real tokens).
    params : SamplingParams
        The length limits, EOS ids and logits processors. `do_sample=True` is beam sampling
        (HF's): the warpers (temperature, top-k, top-p, min_p, typical_p, each keeping at least
        #EOS + 1 tokens) apply to the log-probs, and the K continuations are drawn without
        replacement from the softmax of the accumulated scores instead of taken as the top K.
    num_beams, num_return : beams per prompt; hypotheses returned per prompt (<= num_beams).
    length_penalty : float, exponent of the generated length dividing a hypothesis' score.
    early_stopping : True, False or "never".
    fill : the token that pads hypotheses shorter than the longest returned one.
    want_scores, want_logits : keep each step's processed log-probs / raw logits.
    seed : int or None
        Beam sampling draws from a generator seeded with it (None: torch's global RNG, as HF).
    kernels, cuda_graphs, gemv_decode : as for `gptfast.Engine` (None: GPTFAST_KERNELS,
        GPTFAST_CUDA_GRAPHS when the search starts, the GEMV decode ops); graphs asked for with
        the reference ops on CUDA are a ValueError, as for an Engine (`RuntimeOptions.use_graphs`).

    Returns
    -------
    BeamResult

    Notes
    -----
    The whole search holds the model's KV-cache lock (`KVCache.lock`): engines on the same model
    wait for it between their steps, as they wait for each other's steps. Before the prompts may
    reuse cached prefixes, the weights are compared with the ones the prefixes were computed
    from, as an `Engine` does.
    """
    options = RuntimeOptions.with_defaults(kernels=kernels, cuda_graphs=cuda_graphs, gemv_decode=gemv_decode)
    cache = model.kv_cache
    with cache.lock, ops.backend(options.kernels, options.gemv_decode):
        cache.check_weights(weights_fingerprint(model))
        return _search(model, cache, prompts, params, num_beams=num_beams, num_return=num_return,
                       length_penalty=length_penalty, early_stopping=early_stopping, fill=fill,
                       want_scores=want_scores, want_logits=want_logits, seed=seed, options=options)


def _search(model, cache, prompts, params, *, num_beams, num_return, length_penalty, early_stopping,
            fill, want_scores, want_logits, seed, options: RuntimeOptions) -> BeamResult:
    """`beam_search` under the cache lock."""
    manager, bs = cache.manager, cache.block_size
    device = model.device
    B, nb, V = len(prompts), num_beams, model.config.vocab_size
    max_new = params.max_new_tokens
    eos = params.eos_token_ids
    K = max(2, 1 + len(eos)) * nb
    # NOTE: the search state lives on the model's device; only the chosen parents and tokens,
    # (B, nb) each, and the stop flag come to the host every step
    top_nb = torch.zeros(K, dtype=torch.bool, device=device)
    top_nb[:nb] = True
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * nb
    generator = None
    if seed is not None and params.do_sample:
        generator = torch.Generator(device=device).manual_seed(seed)

    need = -(-(max(len(p) for p in prompts) + max_new - 1) // bs)
    if need > manager.total_blocks:
        raise ValueError(f"a beam of {max(len(p) for p in prompts)} prompt + {max_new} new tokens "
                         f"needs {need} KV blocks of {bs} tokens, but the pool has only "
                         f"{manager.total_blocks}; load the model with a larger num_kv_blocks")

    running_tokens = torch.full((B, nb, max_new), fill, dtype=torch.long, device=device)
    running_idx = torch.full((B, nb, max_new), -1, dtype=torch.int32, device=device)
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = _NEG  # step 0: only the first (identical) beam's continuations count
    fin_tokens, fin_idx = running_tokens.clone(), running_idx.clone()
    fin_scores = torch.full((B, nb), _NEG, device=device)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    scores_out = [] if want_scores else None
    logits_out = [] if want_logits else None

    use_graphs = options.use_graphs(device.type)  # as an Engine decides it
    # the model's runner if it has the rows (a smaller one is rebuilt only as large as needed)
    runner = graphs.graph_runner(model, min(graphs.MAX_BATCH, B * nb)) if use_graphs else None
    if runner is not None and B * nb > runner.max_batch:
        runner = None
    live: set[int] = set()  # manager sequences this search holds
    peak = 0
    interrupted = True
    try:
        # ---- prefill: one sequence per prompt (its beams fork from it after the first choice)
        sids = list(cache.new_sequence_ids(B))
        cached = []
        for sid, p in zip(sids, prompts):
            cached.append(manager.allocate_prompt(sid, np.asarray(p, dtype=np.int64)))
            if cached[-1] < 0:
                raise ValueError(f"the KV-cache pool ({manager.total_blocks} blocks of {bs}) cannot "
                                 f"hold the {B} prompts of this beam search; load the model with a "
                                 f"larger num_kv_blocks")
            live.add(sid)
        logits = _prefill(model, manager, sids, prompts, cached)  # (B, V)
        seqs = [Sequence(sid, len(p), list(p), params, 0, 0) for sid, p in zip(sids, prompts)]
        beam_sids = [[sid] * nb for sid in sids]  # (B, nb): every beam is the prompt at step 0
        histories = [[list(p)] * nb for p in prompts]
        for g in range(max_new):
            peak = max(peak, manager.total_blocks - manager.num_free_blocks())
            raw = logits.float()
            logp = process_logits(torch.log_softmax(raw, dim=-1), seqs)
            if params.do_sample:
                logp = processors.warp_(logp, params.temperature, params.top_k, params.top_p,
                                        params.min_p, params.typical_p, len(eos) + 1 if eos else 2)
            if g == 0:  # HF runs B * num_beams identical rows at the first step
                raw, logp = raw.repeat_interleave(nb, 0), logp.repeat_interleave(nb, 0)
            if want_logits:
                logits_out.append(raw.clone())
            if want_scores:
                scores_out.append(logp.clone())
            acc = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
            if params.do_sample:
                top_i = torch.multinomial(acc.softmax(dim=-1), K, generator=generator)
                top_lp, order = acc.gather(1, top_i).sort(dim=-1, descending=True)
                top_i = top_i.gather(1, order)
            else:
                top_lp, top_i = torch.topk(acc, K)  # (B, K)
            parent, token = top_i // V, top_i % V
            cand_tokens = _gather(running_tokens, parent)
            cand_tokens[:, :, g] = token
            cand_idx = _gather(running_idx, parent)
            cand_idx[:, :, g] = (parent + batch_offset).int()
            ends = torch.isin(token, eos_t) | (g + 1 >= max_new)  # (B, K)

            # the next running beams: the best continuations that do not end
            run_lp = top_lp + ends.float() * _NEG
            nxt = torch.topk(run_lp, nb).indices  # (B, nb)
            running_tokens, running_idx = _gather(cand_tokens, nxt), _gather(cand_idx, nxt)
            running_scores = _gather(run_lp, nxt)

            # finished hypotheses: the ended ones among the first num_beams compete
            just = ends & top_nb[None, :]
            fl = top_lp / ((g + 1) ** length_penalty)
            full = fin_done.all(dim=-1, keepdim=True) & (early_stopping is True)
            fl = fl + full.float() * _NEG + (~improvable).float() * _NEG + (~just).float() * _NEG
            merged = torch.cat([fin_scores, fl], dim=1)
            keep = torch.topk(merged, nb).indices
            fin_tokens = _gather(torch.cat([fin_tokens, cand_tokens], 1), keep)
            fin_idx = _gather(torch.cat([fin_idx, cand_idx], 1), keep)
            fin_done = _gather(torch.cat([fin_done, just], 1), keep)
            fin_scores = _gather(merged, keep)

            # can a running beam still beat the worst finished hypothesis?
            length = max_new if (early_stopping == "never" and length_penalty > 0) else g + 1
            best = running_scores[:, :1] / (length ** length_penalty)
            worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, _NEG)
            improvable = improvable & (best > worst).any(dim=-1, keepdim=True)
            if not (bool(improvable.any()) and not (bool(fin_done.all()) and early_stopping is True)
                    and not bool(ends.all())):
                break

            # ---- the KV side of the choice: forks and frees in the block manager
            src = (parent.gather(1, nxt)).tolist()  # (B, nb) beam each new beam continues
            new_tok = token.gather(1, nxt).tolist()
            beam_sids = reassign_beams(manager, lambda: cache.new_sequence_ids(1).start, beam_sids, src, live)
            histories = [[histories[b][p] + [new_tok[b][j]] for j, p in enumerate(row)]
                         for b, row in enumerate(src)]
            flat = [sid for row in beam_sids for sid in row]
            seqs = [Sequence(sid, len(prompts[i // nb]), h, params, 0, 0, num_generated=g + 1)
                    for i, (sid, h) in enumerate(zip(flat, (h for row in histories for h in row)))]
            logits = _decode(model, manager, cache, runner, flat,
                             [h[-1] for row in histories for h in row],
                             [len(h) for row in histories for h in row])
        interrupted = False
    finally:
        for sid in live:
            manager.free(sid)
        if interrupted:
            # blocks of a step that never completed may carry hashes of K/V never written
            manager.reset_prefix_cache()

    sequences = fin_tokens[:, :num_return].reshape(B * num_return, max_new).cpu()
    idx = fin_idx[:, :num_return].reshape(B * num_return, max_new).cpu()
    width = int((idx >= 0).sum(dim=1).max())
    return BeamResult(sequences[:, :width], fin_scores[:, :num_return].reshape(-1).cpu(),
                      idx[:, :width], scores_out, logits_out, peak)


def reassign_beams(manager, new_id, beam_sids: list[list[int]], src: list[list[int]],
                   live: set[int]) -> list[list[int]]:
    """The block-manager side of one beam choice: no K/V is copied here.

    Parameters
    ----------
    manager : gptfast._C.BlockManager
    new_id : callable returning an unused sequence id
    beam_sids : (B, nb) the running beams' sequence ids
    src : (B, nb) for each new beam, the index of the running beam it continues
    live : the ids this search holds, updated

    Returns
    -------
    (B, nb) the new beams' sequence ids: a parent's first child keeps its sequence, the others
    fork it (sharing every block; the next append copies a shared partial block on write), and
    parents no beam continues are freed.
    """
    out = []
    for row_sids, row_src in zip(beam_sids, src):
        taken: set[int] = set()
        row = []
        for p in row_src:
            old = row_sids[p]
            if old in taken:
                sid = new_id()
                manager.fork(old, sid)
                live.add(sid)
            else:
                sid = old
                taken.add(old)
            row.append(sid)
        for old in set(row_sids) - taken:
            manager.free(old)
            live.discard(old)
        out.append(row)
    return out


def _prefill(model, manager, sids: list[int], prompts: list[list[int]],
             cached: list[int]) -> torch.Tensor:
    """The prompts' uncached tokens as one flattened batch (the prefix cache holds the first
    `cached[i]` tokens of prompt i); returns each prompt's last logits (B, V) fp32."""
    lens = [len(p) for p in prompts]
    n_new = [n - c for n, c in zip(lens, cached)]
    cu = np.zeros(len(prompts) + 1, dtype=np.int32)
    np.cumsum(n_new, out=cu[1:])
    tokens = np.concatenate([np.asarray(p[c:], dtype=np.int64) for p, c in zip(prompts, cached)])
    positions = np.concatenate([np.arange(c, n, dtype=np.int64) for n, c in zip(lens, cached)])
    slots = np.empty(int(cu[-1]), dtype=np.int64)
    for i, sid in enumerate(sids):
        manager.slot_mapping(sid, cached[i], lens[i], slots[cu[i]:cu[i + 1]])
    tables = block_tables(manager, np.asarray(sids, dtype=np.int64), max(lens))
    batch = PrefillBatch([], tokens, positions, slots, cu, np.asarray(lens, dtype=np.int32), tables, max(n_new))
    return model.forward_paged(*batch.model_inputs(model.device), cache=model.kv_cache)


def _decode(model, manager, cache, runner, sids: list[int], tokens: list[int],
            lens: list[int]) -> torch.Tensor:
    """One decode step of every running beam: append each beam's newest token (copy-on-write
    of shared partial blocks), run the decode graph up to the logits (or the paged forward
    eagerly when `runner` is None); returns (rows, V) fp32 logits."""
    ids = np.asarray(sids, dtype=np.int64)
    R = len(sids)
    if manager.blocks_needed_for_append(ids) > manager.num_free_blocks():
        raise ValueError(f"the KV-cache pool ({manager.total_blocks} blocks) cannot hold the next "
                         f"step of {R} beams; load the model with a larger num_kv_blocks "
                         f"or use fewer beams")
    tok = np.asarray(tokens, dtype=np.int64)
    slots = np.empty(R, dtype=np.int64)
    cow = np.empty((R, 2), dtype=np.int64)
    n_cow = manager.append_tokens(ids, tok, slots, cow)
    if n_cow:
        cache.copy_blocks(torch.from_numpy(cow[:n_cow]))
    lens_a = np.asarray(lens, dtype=np.int32)
    # the beams draw nothing on the device: the batch has no sampling rows (offsets unused)
    batch = DecodeBatch([], ids, tok, lens_a.astype(np.int64) - 1, slots, lens_a,
                        block_tables(manager, ids, int(lens_a.max())), np.zeros(R, dtype=np.int64), None)
    if runner is not None:
        runner.load(batch)
        return runner.run(R, sample=False)
    return model.forward_paged(*batch.model_inputs(model.device), cache=cache)


def check_beam_request(config, prompts: list[list[int]], params: SamplingParams, num_beams, num_return,
                       early_stopping) -> None:
    """The checks of `Engine.beam_search`'s arguments (ValueError naming the first bad one)."""
    if not isinstance(num_beams, int) or num_beams < 2:
        raise ValueError(f"num_beams must be an int >= 2, got {num_beams!r}")
    if not isinstance(num_return, int) or not 1 <= num_return <= num_beams:
        raise ValueError(f"num_return must be an int in [1, num_beams={num_beams}], got {num_return!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not prompts or any(not p for p in prompts):
        raise ValueError("beam_search needs at least one prompt, each with at least one token")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
        if len(p) + params.max_new_tokens > config.n_positions:
            raise ValueError(f"{len(p)} prompt + {params.max_new_tokens} new tokens exceed the "
                             f"model's n_positions ({config.n_positions})")

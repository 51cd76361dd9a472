"""Hugging Face's logits processors that gptfast runs eagerly, between the logits and the draw.

The engine's decode graph samples with temperature, top-k and top-p fused into one kernel; the
options below need a sequence's history (n-gram bans, bad words) or a second pass over the
softmax (min-p, typical), so a step with any of them stops its graph at the logits and runs
these in PyTorch (`sampler.process_logits`, then the warpers), in HF's order:

    repetition penalty -> no_repeat_ngram_size -> bad_words_ids -> min-length EOS mask
    -> suppress_tokens -> begin_suppress_tokens            (every decoding mode)
    -> temperature -> top-k -> top-p -> min_p -> typical_p  (sampling only)

Each function matches the math of the HF processor of the same name (transformers 5.24); the
history a row sees is its own real tokens (prompt without padding, then generated tokens).
"""

from __future__ import annotations

import numpy as np
import torch


def no_repeat_ngram_bans(tokens: list[int], n: int) -> np.ndarray:
    """Tokens that would complete an n-gram already in `tokens` (HF's NoRepeatNGram).

    Parameters
    ----------
    tokens : list of int
        The row's history, prompt included.
    n : int
        The n-gram size, >= 1.

    Returns
    -------
    int64 array of banned token ids (may repeat).
    """
    if len(tokens) < n:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(tokens, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(arr, n)  # (L - n + 1, n)
    # The window starting at the current suffix would need one more token: it never matches,
    # so a suffix never bans its own successor.
    suffix = arr[len(arr) - n + 1:]
    match = (windows[:, :-1] == suffix).all(axis=1)
    return windows[match, -1]


def bad_words_bans(tokens: list[int], bad_words: tuple[tuple[int, ...], ...]) -> list[int]:
    """Last tokens of the `bad_words` sequences whose other tokens end `tokens` (HF's NoBadWords).

    A one-token bad word is always banned; a longer one only when the row's history ends with
    all of it but its last token.
    """
    banned = []
    L = len(tokens)
    for word in bad_words:
        k = len(word) - 1
        if k == 0 or (k <= L and tuple(tokens[L - k:]) == word[:-1]):
            banned.append(word[-1])
    return banned


def min_p_(scores: torch.Tensor, min_p: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """HF's MinPLogitsWarper: drop tokens whose probability is below min_p times the top one's.

    Parameters
    ----------
    scores : (R, V) fp32 tensor, modified in place.
    min_p : (R,) fp32 tensor in [0, 1].
    min_keep : the most likely `min_keep` tokens always survive.

    Returns
    -------
    `scores`, with removed entries -inf.
    """
    probs = scores.softmax(dim=-1)
    remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.topk(min(min_keep, probs.shape[-1]), dim=-1).indices, False)
    return scores.masked_fill_(remove, float("-inf"))


def typical_(scores: torch.Tensor, mass: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """HF's TypicalLogitsWarper (locally typical sampling): keep the tokens whose surprisal is
    closest to the entropy until their probabilities add up to `mass`.

    Parameters
    ----------
    scores : (R, V) fp32 tensor, modified in place.
    mass : (R,) fp32 tensor in (0, 1).
    min_keep : the `min_keep` most typical tokens always survive.

    Returns
    -------
    `scores`, with removed entries -inf.
    """
    logp = scores.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, order = shifted.sort(dim=-1)
    cum = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass[:, None]).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    remove_sorted = sorted_shift > sorted_shift.gather(1, last[:, None])
    remove_sorted[:, :min_keep] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill_(remove, float("-inf"))


def warp_(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
          typical_p: float, min_keep: int) -> torch.Tensor:
    """HF's sampling warpers with one setting for every row, in HF's order: temperature, top-k,
    top-p, min_p, typical_p, each keeping at least `min_keep` tokens (beam sampling keeps
    #EOS + 1, so a beam can always continue).

    Parameters
    ----------
    scores : (R, V) fp32 tensor, modified in place.
    temperature : > 0; top_k : 0 is off; top_p, typical_p : 1.0 is off; min_p : 0.0 is off.
    min_keep : int >= 1.

    Returns
    -------
    `scores`, with removed entries -inf. Unlike the engine's sampler, top-p breaks ties at its
    boundary by position, as HF's sort does.
    """
    if temperature != 1.0:
        scores.div_(temperature)
    V = scores.shape[-1]
    if top_k:
        k = min(max(top_k, min_keep), V)
        kth = scores.topk(k, dim=-1).values[:, -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = scores.sort(dim=-1, descending=False)
        remove = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[:, -min_keep:] = False
        scores.masked_fill_(remove.scatter(1, order, remove), float("-inf"))
    R = scores.shape[0]
    if min_p > 0:
        min_p_(scores, torch.full((R,), min_p, device=scores.device), min_keep)
    if typical_p < 1.0:
        typical_(scores, torch.full((R,), typical_p, device=scores.device), min_keep)
    return scores

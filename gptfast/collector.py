"""The lock-step collector: the engine's tokens, handed out step by step as HF's loop makes them.

The engine produces each sequence's tokens at its own pace (rows finish, are preempted and
resumed independently). HF's `generate()` hands its watchers one step of every row at a time:
streamers get a `(rows,)` tensor of the step's tokens, stopping criteria see the sequences so far
and the step's scores, `output_scores` / `output_logits` are one `(rows, V)` tensor per step.
`LockstepCollector` keeps each output row's tokens (and scores) and emits step t once every row
still running has produced its token t. Rows that ended hold the pad id (tokens) or -inf
(scores) in later steps.
"""

from __future__ import annotations

import torch


class LockstepCollector:
    """Runs an engine to the end and collects its tokens per output row, in HF's step order.

    Parameters
    ----------
    engine : gptfast.Engine
        With every sequence of the call added.
    seq_rows : dict of int to int
        Each engine sequence id's output row.
    prompts : LongTensor (rows, T), on the CPU
        Each output row's prompt as given (stopping criteria see it before the new tokens).
    pad : int or None
        Fills rows after they end (0 when None).
    streamer : object with `put(tokens)`, or None
    criteria : list of callables
        HF stopping criteria, `criterion(sequences, scores) -> bool or BoolTensor (rows,)`.
    cut_stopped_rows : bool
        Whether a row a criterion stops ends there (HF does so only when an EOS id is set;
        otherwise every row runs until all are stopped).
    want_scores, want_logits : bool
        Keep each step's scores / raw logits.
    vocab : int
    device : torch.device
        Where the sequences, scores and logits handed out live.
    """

    def __init__(self, engine, seq_rows: dict[int, int], prompts: torch.Tensor, pad: int | None, streamer,
                 criteria: list, cut_stopped_rows: bool, want_scores: bool, want_logits: bool, vocab: int,
                 device):
        self.engine = engine
        self.seq_rows = seq_rows
        self.row_seqs = {r: s for s, r in seq_rows.items()}
        self.prompts = prompts
        self.rows = rows = prompts.shape[0]
        self.pad = pad if pad is not None else 0
        self.streamer = streamer
        self.criteria = criteria
        self.cut_stopped_rows = cut_stopped_rows
        self.want_scores, self.want_logits = want_scores, want_logits
        self.vocab = vocab
        self.device = device
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.row_scores: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        self.row_logits: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        self.end: list[int | None] = [None] * rows  # the row's final length, once known
        self.emitted = 0  # steps handed out so far
        self.scores: list[torch.Tensor] = []  # (rows, V) per step, on `device`
        self.logits: list[torch.Tensor] = []
        self.stopped: set[int] = set()  # rows a stopping criterion has flagged

    @property
    def watched(self) -> bool:
        """Whether anything looks at the steps (else the tokens are only assembled at the end)."""
        return self.streamer is not None or bool(self.criteria) or self.want_scores or self.want_logits

    def run(self) -> None:
        """Step the engine until every sequence is done, emitting each complete step."""
        engine = self.engine
        while engine.has_unfinished():
            for out in engine.step():
                self._collect(out)
            self._emit_ready_steps()
        self._emit_ready_steps()

    def _collect(self, out) -> None:
        r = self.seq_rows[out.seq_id]
        if self.end[r] is not None:
            return  # a row a stopping criterion ended: its cancelled sequence's last outputs
        self.tokens[r].append(out.token)
        if self.want_scores or self.criteria:
            self.row_scores[r].append(out.scores)
        if self.want_logits:
            self.row_logits[r].append(out.logits)
        if out.finished:
            self.end[r] = len(self.tokens[r])

    def _emit_ready_steps(self) -> None:
        """Emit every step that all unfinished rows have produced."""
        if not self.watched:
            return
        while True:
            t = self.emitted
            live = [r for r in range(self.rows) if self.end[r] is None or self.end[r] > t]
            if not live or any(len(self.tokens[r]) <= t for r in live):
                return
            step = torch.full((self.rows,), self.pad, dtype=torch.long)
            for r in live:
                step[r] = self.tokens[r][t]
            scores = self._step_rows(self.row_scores, live, t) if self.want_scores or self.criteria else None
            if self.want_scores:
                self.scores.append(scores.to(self.device))
            if self.want_logits:
                self.logits.append(self._step_rows(self.row_logits, live, t).to(self.device))
            self.emitted = t + 1
            if self.streamer is not None:
                self.streamer.put(step)
            if self.criteria:
                self._apply_criteria(scores, live, t)

    def _step_rows(self, per_row: list[list[torch.Tensor]], live: list[int], t: int) -> torch.Tensor:
        """Step t's (rows, V) tensor of the live rows' vectors, -inf for the others."""
        out = torch.full((self.rows, self.vocab), float("-inf"))
        for r in live:
            out[r] = per_row[r][t]
            per_row[r][t] = None  # copied out: let the step's tensor go
        return out

    def _apply_criteria(self, scores: torch.Tensor, live: list[int], t: int) -> None:
        seqs = torch.cat([self.prompts, self._tokens_tensor(self.emitted)], dim=1).to(self.device)
        stop = torch.zeros(self.rows, dtype=torch.bool)
        for c in self.criteria:
            res = c(seqs, scores.to(self.device))
            stop |= torch.as_tensor(res, dtype=torch.bool).cpu().expand(self.rows)
        # NOTE: like HF, a row a criterion stops is padded from then on only when an EOS token
        # is set; otherwise it keeps generating until every row is stopped.
        self.stopped |= {r for r in live if bool(stop[r])}
        if self.cut_stopped_rows:
            cut = [r for r in live if r in self.stopped]
        elif all(r in self.stopped for r in live):
            cut = live
        else:
            cut = []
        for r in cut:
            if self.end[r] is None or self.end[r] > t + 1:
                self.end[r] = t + 1
                del self.tokens[r][t + 1:]
                self.engine.cancel(self.row_seqs[r])

    def _tokens_tensor(self, width: int) -> torch.Tensor:
        out = torch.full((self.rows, width), self.pad, dtype=torch.long)
        for r, toks in enumerate(self.tokens):
            n = min(len(toks), width)
            if n:
                out[r, :n] = torch.tensor(toks[:n], dtype=torch.long)
        return out

    def new_tokens(self) -> torch.Tensor:
        """Every row's new tokens, (rows, longest), padded with the pad id after a row ends."""
        width = max((len(t) for t in self.tokens), default=0)
        return self._tokens_tensor(width)

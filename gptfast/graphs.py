"""The decode step as CUDA graphs: static buffers, one graph per batch-size bucket.

A decode step of GPT-2 124M at batch 1 is 64 small kernels, 63 greedy (`gptfast kernels` counts them),
most of them ~1 µs of DRAM time; launched one by
one from Python the step is bound by the host (tens of µs per layer). `DecodeGraphRunner`
captures the whole step (embedding, every block, the final LayerNorm, the head and the sampler)
once per batch-size bucket and replays it: one graph launch per step, no host sync inside it.

Everything the step reads lives in static buffers at fixed addresses, packed in one pinned host
buffer and one device buffer of the same layout, so a step's inputs go over in a single copy:

    tokens, positions, slot_mapping : [max_batch] int64
    seeds, offsets                  : [max_batch] int64  (Philox key and token index per row)
    seq_lens, top_k, advance        : [max_batch] int32
    temperature, top_p              : [max_batch] fp32
    block_tables                    : [max_batch, max_blocks] int32, max_blocks = ceil(n_positions / block_size)

The engine hands a step over as a `gptfast.batch.DecodeBatch`; `load(batch)` copies it into
rows 0:B of the host buffers (the per-sequence sampling constants only when they are not the
ones loaded last). The step's first kernel (`ops.decode_inputs_`) derives each row's K/V slot from its position and
block table, and, for rows whose `advance` flag is set, first feeds the previous step's sampled
token back (position, length and Philox offset + 1). The sampler writes its tokens and status into
static outputs; after each replay they are copied to a pinned host slot (a ring of two) and an
event is recorded. So a step can be launched in two ways:

- `launch(batch)`: rows 0:batch were loaded (advance 0); one upload, one replay.
- `launch_next(batch, new_blocks)`: the step continues the last one on the device, with no
  upload; the host only names the blocks of rows that cross a block boundary (written into the
  device block table). This is how the engine keeps the next step queued on the GPU while it
  reads the previous step's tokens (`collect`), so the GPU never waits for the host in between.

A batch of B rows replays the smallest bucket >= B; rows B.. of the bucket are padding: slot -1
(the K/V write is skipped), seq_len 0 (attention outputs zeros), greedy, so they read nothing of
the cache and cost one row of compute. Each bucket has up to three graphs: "sample" (the whole
step, the sampled tokens and status come back); "greedy" (the same outputs for a batch whose rows
are all greedy, at most `ops.gemv.MAX_ROWS` rows on the GEMV ops: it ends in `ops.layernorm_head_argmax`,
the final LayerNorm, head GEMV and argmax fused, with no logits written; `launch` picks it from
the rows' temperatures); and "logits" (up to the fp32 logits, for steps whose logits processors
or score outputs must see the logits before the draw; the sampler then runs eagerly). The
graphs are captured on first use, each (bucket, variant) once.

On the CPU there is nothing to capture: the runner runs the same step function on the same static
buffers eagerly. That is how the CPU tests check the graph path's padding and bookkeeping.

The graphs hold the addresses of the weights and the KV cache: `graph_runner(model)` rebuilds the
runner when a parameter tensor or the cache was replaced (in-place weight updates need nothing).
A live `Engine` notices a replacement through the model's `weights_version` (a parameter
registration such as `module.weight = nn.Parameter(...)` or `load_state_dict(..., assign=True)`,
or a move/cast of the model); a `param.data = t` swap is not seen by an engine already running
(a new `generate()` call or `Engine` is: `graph_runner` compares the addresses themselves).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import time
import weakref

import torch

from . import ops
from .kv_cache import AttnMetadata

# Batch-size buckets: every size up to 8, then steps of 8 up to 64, then of 32: at most 7 padding
# rows up to 64 and 31 above (a third of the rows at worst, B = 65 in 96); 21 buckets, each with up
# to three graphs (sample, greedy, logits) captured on first use.
# Padding rows cost compute only; the step's weight traffic does not grow with them.
_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8, *range(16, 65, 8), *range(96, 257, 32)]
# The row stride of the step's logits, in elements, is a multiple of this (GPT-2: 50,304 for
# 50,257): rows start 128-byte aligned in fp16/bf16 (256 in fp32), for the sampler's vector loads.
LOGITS_ROW_ALIGN = 64
# The largest batch captured by default (an engine's max_num_seqs caps it); larger steps run eagerly.
MAX_BATCH = 256

# (name, dtype, per-row width); width 0 means the block-table width.
# NOTE: block_tables last: a step uploads the buffer only up to its bucket's last block-table row.
_FIELDS = [
    ("tokens", torch.int64, 1), ("positions", torch.int64, 1), ("slot_mapping", torch.int64, 1),
    ("seeds", torch.int64, 1), ("offsets", torch.int64, 1),
    ("seq_lens", torch.int32, 1), ("top_k", torch.int32, 1), ("advance", torch.int32, 1),
    ("temperature", torch.float32, 1), ("top_p", torch.float32, 1),
    ("block_tables", torch.int32, 0),
]

def buckets_up_to(max_batch: int) -> list[int]:
    """The bucket sizes a runner for `max_batch` rows captures (the last one is `max_batch`)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in _BUCKETS if b < max_batch]
    return sizes + [max_batch]


class _Buffers:
    """Named views into one byte buffer (all fields 8-byte aligned)."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device, pin: bool):
        layout, offset = [], 0
        for name, dtype, width in _FIELDS:
            cols = max_blocks if width == 0 else width
            nbytes = max_batch * cols * torch.empty((), dtype=dtype).element_size()
            layout.append((name, dtype, cols, offset, nbytes))
            offset += -(-nbytes // 8) * 8
        # NOTE: outside inference mode (engines are built inside it): the buffers are written
        # in place from anywhere.
        with torch.inference_mode(False):
            self.raw = torch.zeros(offset, dtype=torch.uint8, device=device, pin_memory=pin)
        for name, dtype, cols, start, nbytes in layout:
            view = self.raw[start:start + nbytes].view(dtype)
            setattr(self, name, view.view(max_batch, cols) if name == "block_tables" else view)
        self.tables_offset = layout[-1][3]
        self.table_row_bytes = max_blocks * 4

    def upload_bytes(self, bucket: int) -> int:
        """Bytes of the buffer a step of `bucket` rows reads (every field, `bucket` table rows)."""
        return self.tables_offset + bucket * self.table_row_bytes


class DecodeGraphRunner:
    """One decode step of a `GPT2` over static buffers, as a CUDA graph per batch-size bucket.

    Parameters
    ----------
    model : gptfast.GPT2
    max_batch : int
        Largest batch captured (default 256); larger batches run eagerly.

    Attributes
    ----------
    buckets : list of int
        The batch sizes it captures, each on first use.
    capture_seconds : float
        Wall time spent warming up and capturing, all graphs so far.
    num_replays : int
        Steps run through the runner.
    steps_by_variant : collections.Counter
        Steps run per graph variant: "sample", "greedy" (the fused greedy head) and "logits".
    captured : bool
        Whether steps replay CUDA graphs (False on the CPU: the step runs eagerly).
    """

    def __init__(self, model, max_batch: int = MAX_BATCH):
        # NOTE: weak: the model keeps its runner, and a runner must not keep its model alive.
        self._model = weakref.ref(model)
        config = model.config
        self.device = model.device
        self.block_size = model.block_size
        self.max_blocks = -(-config.n_positions // self.block_size)
        self.max_batch = max_batch
        self.buckets = buckets_up_to(max_batch)
        self.captured = self.device.type == "cuda"
        # The small-batch op set its steps run (`ops.backend(..., gemv_decode=...)` where it was
        # built): a runner serves one op set (`graph_runner` keys runners by it), whatever context
        # a later call comes from.
        self.gemv_decode = ops.gemv_decode_enabled()
        self.capture_seconds = 0.0
        self.num_replays = 0
        # The per-sequence sampling constants loaded last (`batch.SamplingRows`): a batch with the
        # same ones skips copying them; None when no rows hold a whole set.
        self._sampling = None
        self.steps_by_variant = collections.Counter()
        self.host = _Buffers(max_batch, self.max_blocks, torch.device("cpu"), pin=self.captured)
        self.dev = self.host if not self.captured else _Buffers(max_batch, self.max_blocks, self.device, False)
        # numpy views of the host buffers, which `load` fills
        self._rows = {name: getattr(self.host, name).numpy() for name, _, _ in _FIELDS}
        self.cache = model.kv_cache  # NOTE: the graphs hold its tensors' addresses
        self._graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}  # by (bucket, variant)
        self._outputs: dict[tuple[int, str], tuple] = {}
        self._pool = None
        self._clear_rows(0, max_batch)
        # The sampler's static outputs, tokens then status, in one byte buffer (one copy back):
        # tokens [max_batch] int64, status [max_batch] int32. The next step reads the tokens.
        with torch.inference_mode(False):
            self.out_dev = torch.zeros(12 * max_batch, dtype=torch.uint8, device=self.device)
        self.sampled = self.out_dev[:8 * max_batch].view(torch.int64)
        self.status = self.out_dev[8 * max_batch:].view(torch.int32)
        self._launches = 0  # sampling steps launched (each launch's id)
        self._chain = None  # (bucket, id) of the sampling step that ran last: a step may continue it
        self._chain_variant = None  # its graph, "sample" or "greedy"
        self._run_slot = None  # run()'s output slot, made on first use
        if self.captured:
            # NOTE: one warm-up stream for every capture: PyTorch keeps a cuBLAS workspace per
            # stream for the life of the process.
            self._warm_stream = torch.cuda.Stream(self.device)
            self._uploaded = torch.cuda.Event()
            with self._on_device():
                self.dev.raw.copy_(self.host.raw)  # padding rows everywhere to start with
            # Every graph is captured on first use (`_replay`): a batch-1 generate() captures one
            # or two graphs, not the 21 buckets' (each a warm-up step and a capture), so the first
            # call is not slowed by buckets it never runs.

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this DecodeGraphRunner was deleted")
        return model

    def _on_device(self):
        # torch.cuda.graph captures on the current device's stream: make it the model's
        return torch.cuda.device(self.device) if self.captured else contextlib.nullcontext()

    # ------------------------------------------------------------------ the step
    def _step(self, batch: int, variant: str):
        with ops.backend(ops.kernel_backend(), self.gemv_decode):
            return self._step_ops(batch, variant)

    def _step_ops(self, batch: int, variant: str):
        d = self.dev
        # the slots (and, for rows that continue the last step, the inputs) on the device
        ops.decode_inputs_(d.tokens[:batch], d.positions[:batch], d.seq_lens[:batch], d.offsets[:batch],
                           d.slot_mapping[:batch], d.advance[:batch], self.sampled[:batch],
                           d.block_tables[:batch], self.block_size)
        meta = AttnMetadata(
            slot_mapping=d.slot_mapping[:batch],
            block_tables=d.block_tables[:batch],
            seq_lens=d.seq_lens[:batch],
            cu_seqlens_q=None,
            max_seqlen_q=1,
            is_decode=True,
        )
        out = (self.sampled[:batch], self.status[:batch])
        if variant == "greedy":
            # final LayerNorm, head GEMV and argmax fused: the logits never reach memory, the
            # tokens land where the next step's inputs are read from
            self.model.forward_paged_greedy(d.tokens[:batch], d.positions[:batch], meta, cache=self.cache, out=out)
            return ()
        # The sampler reads the logits in the model's dtype (it computes in fp32): no cast. Their
        # rows are padded to a multiple of LOGITS_ROW_ALIGN elements, so that every row starts
        # aligned and the sampler's loads vectorise; the pad columns lie outside the (B, V) view.
        model = self.model
        V = model.config.vocab_size
        fp32 = variant == "logits"
        rows = torch.empty((batch, -(-V // LOGITS_ROW_ALIGN) * LOGITS_ROW_ALIGN),
                           dtype=torch.float32 if fp32 else model.dtype, device=self.device)
        logits = model.forward_paged(d.tokens[:batch], d.positions[:batch], meta, cache=self.cache,
                                     fp32_logits=fp32, out=rows[:, :V])  # (B, V), row stride padded
        if variant == "logits":
            return (logits,)
        ops.sample(logits, d.temperature[:batch], d.top_k[:batch], d.top_p[:batch],
                   d.seeds[:batch], d.offsets[:batch], out=out)
        return ()

    def _capture(self, batch: int, variant: str) -> None:
        with torch.inference_mode():
            stream = self._warm_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step(batch, variant)  # warm-up: compiles every kernel, runs on padding rows
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step(batch, variant)
            torch.cuda.synchronize(self.device)
        self._graphs[(batch, variant)] = graph
        self._outputs[(batch, variant)] = out

    def buckets_captured(self, variant: str = "sample") -> list[int]:
        """The buckets whose graph `variant` ("sample", "greedy" or "logits") is captured,
        ascending (none on the CPU, where the step runs eagerly)."""
        return sorted(b for b, v in self._graphs if v == variant)

    def bucket(self, batch: int) -> int | None:
        """The bucket a batch of `batch` rows runs in, or None when it is larger than all."""
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def load(self, batch) -> None:
        """Copy a decode batch into rows 0:B of the host buffers: the next `launch(B)` or
        `run(B, ...)` runs it.

        Parameters
        ----------
        batch : gptfast.batch.DecodeBatch
            B <= max_batch rows. Its slot_mapping may be None (the step derives the slots from
            the block tables); its sampling constants are copied unless they are the ones loaded
            last.
        """
        B = len(batch)
        if B > self.max_batch:
            raise ValueError(f"batch {B} is larger than the runner's largest bucket {self.max_batch}")
        n = self._rows
        n["tokens"][:B] = batch.token_ids
        if batch.slot_mapping is not None:
            n["slot_mapping"][:B] = batch.slot_mapping
        n["seq_lens"][:B] = batch.seq_lens
        n["positions"][:B] = batch.positions
        n["offsets"][:B] = batch.offsets
        width = batch.block_tables.shape[1]
        n["block_tables"][:B, :width] = batch.block_tables
        n["block_tables"][:B, width:] = 0
        rows = batch.sampling
        if rows is not None and rows is not self._sampling:
            self._sampling = rows
            n["seeds"][:B] = rows.seeds
            n["temperature"][:B] = rows.temperature
            n["top_k"][:B] = rows.top_k
            n["top_p"][:B] = rows.top_p

    def _clear_rows(self, start: int, stop: int) -> None:
        if self._sampling is not None and start < len(self._sampling.seeds):
            self._sampling = None  # its rows are cleared: the next batch with them copies them again
        n = self._rows
        for name in ("tokens", "positions", "seq_lens", "top_k", "seeds", "offsets", "temperature", "advance"):
            n[name][start:stop] = 0
        n["top_p"][start:stop] = 1.0
        n["slot_mapping"][start:stop] = -1
        n["block_tables"][start:stop] = 0

    def _bucket_of(self, batch: int) -> int:
        bucket = self.bucket(batch)
        if bucket is None:
            raise ValueError(f"batch {batch} is larger than the runner's largest bucket {self.max_batch}")
        return bucket

    def _replay(self, bucket: int, variant: str, upload: bool) -> None:
        """Upload rows 0:bucket of the host buffers (when `upload`), then run the step."""
        self.model.refresh_weight_copies()  # int8 copies of weights changed in place (none replay stale)
        self.num_replays += 1
        self.steps_by_variant[variant] += 1
        if not self.captured:
            return
        if upload:
            n = self.host.upload_bytes(bucket)
            self.dev.raw[:n].copy_(self.host.raw[:n], non_blocking=True)
            self._uploaded.record()
        key = (bucket, variant)
        if key not in self._graphs:
            t0 = time.perf_counter()
            self._capture(bucket, variant)
            self.capture_seconds += time.perf_counter() - t0
        self._graphs[key].replay()

    # ------------------------------------------------------------------ run
    def output_slot(self) -> "OutputSlot":
        """A host slot for one sampling step's tokens and status (pinned on CUDA). A caller with
        several steps in flight holds one per step."""
        return OutputSlot(self)

    def launch(self, batch: int, out: "OutputSlot") -> int:
        """Launch the sampling step on rows `0:batch` of the host buffers (see `load`);
        its tokens and status are copied into `out` (read them with `out.read`).

        Returns the launch's id (for `launch_next`). The host buffers may be rewritten once `out`
        was read (the upload precedes the step).
        """
        bucket = self._bucket_of(batch)
        if bucket > batch:
            self._clear_rows(batch, bucket)
        self._rows["advance"][:batch] = 0  # every input comes from the host
        variant = self._sampling_variant(batch, bucket)
        with self._on_device():
            self._replay(bucket, variant, upload=True)
            if not self.captured:
                self._step(bucket, variant)
            return self._after_sample(bucket, variant, out)

    def can_continue(self, batch: int, after: int) -> bool:
        """Whether `launch_next(batch, ..., after)` may run: launch `after` was the last sampling
        step of this runner, in the bucket of `batch`."""
        return self._chain == (self.bucket(batch), after)

    def launch_next(self, batch: int, new_blocks, after: int, out: "OutputSlot") -> int:
        """Launch the sampling step that continues launch `after` on the device, with no upload.

        Each row's input is the token launch `after` sampled for it, at the next position; its
        K/V slot comes from the device's block table, into which `new_blocks` ((row, column,
        block id) triples: rows entering a new block) are written first. The caller need not have
        read launch `after`'s tokens. Outputs go to `out`; returns this launch's id.
        """
        if not self.can_continue(batch, after):
            raise RuntimeError(f"launch_next(batch={batch}, after={after}) must continue the last sampling "
                               f"step of its bucket; the last one was {self._chain} (bucket, id)")
        bucket = self._chain[0]
        with self._on_device():
            for row, col, block in new_blocks:
                # NOTE: on CUDA a fill kernel on the stream (the pinned host table may still be
                # uploading); on the CPU the device buffers are the host's.
                self.dev.block_tables[row, col] = block
            variant = self._chain_variant  # the same rows: the same head
            self._replay(bucket, variant, upload=False)
            if not self.captured:
                self._step(bucket, variant)
            return self._after_sample(bucket, variant, out)

    def _sampling_variant(self, batch: int, bucket: int) -> str:
        """The sampling step's graph for rows 0:batch of the host buffers: "greedy" (the fused
        head: final LayerNorm, head GEMV and argmax, no logits) when every row is greedy
        (temperature <= 0) in the GEMV regime (`ops.gemv.MAX_ROWS` rows) of an unquantised model;
        else "sample" (the head to the logits, then the sampler). Both give a greedy row the same
        token: the lowest id among the maxima of the logits in the model's dtype."""
        if not self.has_greedy_head(bucket) or bool((self._rows["temperature"][:batch] > 0).any()):
            return "sample"
        return "greedy"

    def has_greedy_head(self, bucket: int) -> bool:
        """Whether steps of `bucket` rows have the "greedy" graph (the fused head): in the GEMV
        regime (`ops.gemv.MAX_ROWS` rows, GPT-2's tanh-GELU, a runner built with the GEMV ops:
        `self.gemv_decode`) of an unquantised model. Elsewhere the sampler's
        greedy rows cost no more."""
        model = self.model
        return (bucket <= ops.gemv.MAX_ROWS and model.quantize is None and self.gemv_decode
                and model.h[0].mlp.gelu_tanh)

    def _after_sample(self, bucket: int, variant: str, out: "OutputSlot") -> int:
        launch = self._launches
        self._launches += 1
        self._chain = (bucket, launch)
        self._chain_variant = variant
        out.tensor.copy_(self.out_dev, non_blocking=self.captured)
        if self.captured:
            out.event.record()
        return launch

    def run(self, batch: int, sample: bool):
        """Run the step on rows `0:batch` of the host buffers (see `load`).

        Returns (tokens, status) as host int lists when `sample`, else the fp32 logits (batch, V)
        in a static device buffer that the next step overwrites. Either way the host buffers may
        be rewritten as soon as it returns.
        """
        if sample:
            if self._run_slot is None:
                self._run_slot = self.output_slot()
            self.launch(batch, self._run_slot)
            return self._run_slot.read(batch)
        bucket = self._bucket_of(batch)
        if bucket > batch:
            self._clear_rows(batch, bucket)
        self._rows["advance"][:batch] = 0
        self._chain = None  # the sampled tokens on the device are not this step's
        with self._on_device():
            self._replay(bucket, "logits", upload=True)
            if not self.captured:
                return self._step(bucket, "logits")[0][:batch]
            out = self._outputs[(bucket, "logits")]
            # NOTE: the caller may rewrite the pinned host buffer once this returns: wait
            # for the upload (recorded before the replay, so not for the step).
            self._uploaded.synchronize()
            return out[0][:batch]


class OutputSlot:
    """Where one sampling step's tokens and status land on the host (`DecodeGraphRunner.launch`)."""

    def __init__(self, runner: DecodeGraphRunner):
        self.max_batch = runner.max_batch
        with torch.inference_mode(False):
            self.tensor = torch.zeros(12 * runner.max_batch, dtype=torch.uint8, pin_memory=runner.captured)
        self.event = torch.cuda.Event() if runner.captured else None

    def read(self, batch: int) -> tuple[list[int], list[int]]:
        """Wait for the step last launched into this slot; its (tokens, status) for rows 0:batch as
        host int lists (token -1 and status 1 or 2 for a flagged row, see `ops.sample`)."""
        if self.event is not None:
            self.event.synchronize()
        mb = self.max_batch
        tokens = self.tensor[:8 * mb].view(torch.int64)[:batch].tolist()
        status = self.tensor[8 * mb:].view(torch.int32)[:batch].tolist()
        return tokens, status


def _fingerprint(model) -> tuple:
    # NOTE: the small-batch op set (`ops.gemv_decode_enabled`) is part of what a graph captures:
    # a runner serves one op set
    cache = model.kv_cache
    return (id(cache), ops.gemv_decode_enabled(), tuple(p.data_ptr() for p in model.parameters()))


def graph_runner(model, max_batch: int = MAX_BATCH) -> DecodeGraphRunner:
    """The model's decode runner: built (and on CUDA captured) on first use, then shared.

    Ownership: the runner belongs to the model. Capturing costs seconds, so there is one runner
    per model, shared by every engine and beam search on it; it is stored in the slot the model
    declares for it (`GPT2._graph_runner`, which the model empties when it is moved or cast), and
    this function is the only reader and writer of that slot. An engine keeps the runner it got
    and asks again when the model's weights may have been replaced.

    Rebuilt when the KV cache or any parameter tensor was replaced since (the graphs hold their
    addresses), when the op context asks for the other small-batch op set
    (`ops.backend(..., gemv_decode=...)`), or when a larger `max_batch` is asked for.
    """
    key = _fingerprint(model)
    runner = getattr(model, "_graph_runner", None)
    if runner is None or runner[0] != key or runner[1].max_batch < max_batch:
        model._graph_runner = None  # free the old graphs' memory before capturing new ones
        runner = (key, DecodeGraphRunner(model, max_batch))
        model._graph_runner = runner
    return runner[1]

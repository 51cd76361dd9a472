"""The end-to-end suite: gptfast against Hugging Face `generate` and eager PyTorch on the same weights.

1. Weights: a GPT-2 preset built as a `transformers.GPT2LMHeadModel`, randomly initialised from a
   seed (or a checkpoint folder), loaded into gptfast with `GPT2.from_pretrained(hf_model)`. EOS is
   disabled everywhere so every run generates exactly the requested number of tokens.
2. Correctness first, in fp32: greedy tokens of gptfast must equal HF's, token for token, for the
   batch-1 prompt, the first padded batch of mixed-length prompts, and the same prompts served
   through the `Engine` API (the continuous-batching path). On a mismatch the suite reports where
   and times nothing.
3. Timing in the requested dtype, same prompts, the engines interleaved run by run (a burst of
   load on a shared machine then hits every engine, not just one):
   - batch 1: decode tokens/s (first to last streamed token), tokens/s with prefill, time to
     first token, inter-token latency p50/p99 (a streamer timestamps each `put`), weight
     bandwidth = bytes of weights read per decode step × steps/s, as % of the measured copy
     bandwidth (the floor). Bytes per step: every parameter once, the tied head included, except
     the position table (one row is read); for GPT-2 124M in bf16 that is ~247 MB.
     Engines: HF generate (eager), and on CUDA without --quick HF with a static cache +
     torch.compile and `static_ref` (gpt-fast-style eager reference over a static KV cache) under
     torch.compile(mode="reduce-overhead"); on CUDA gptfast with every op through its eager
     reference and CUDA graphs off; gptfast.
   - mixed, padded batches: requests with mixed prompt and output lengths served in left-padded
     batches sorted by output length (HF style, the same batches for every engine); useful
     tokens/s counts each request's own output length.
   - mixed, continuous batching: gptfast gets every request at once through the `Engine` API
     (its own `max_new_tokens` each) and steps until all are done; useful tokens/s end to end,
     time to first token p50 (every request arrives at t=0, so it includes queueing) and
     inter-token latency p50/p99. Its "× HF" is over HF's padded batches: the
     256-request throughput target.
   - decode path (CUDA only): gptfast's fused small-batch decode step (GEMV kernels) against
     the same runtime with that step on the unfused kernels, batch 1 as above; gptfast's row
     carries `speedup_unfused`. On the CPU every op runs its eager reference, so there is
     nothing to compare and the scenario is skipped with a note.
   On CUDA the notes also give the kernels one decode step runs at batch 1 (`kernel_count`; the
   headline `kernels_per_step` is the CUDA graph's replay, the eager count beside it), the device
   time of every kernel in one replay (`replay_kernel_us`, longest first, against the replay's
   span `replay_span_us`) and the CUDA-graph capture time
   (`gptfast.graphs.graph_runner(model).capture_seconds`). The rows are handed to `on_rows` after
   every scenario, so a run cut short keeps what it measured.

The suite is data: `CONTENDERS` (what is timed, each built for a run or left out of it),
`SCENARIOS` (each a `measure` function and the contenders it takes) and `COMPARISONS`; one row
builder, `build_rows`, turns whatever was measured into rows. gptfast's runtime options reach it
as keywords of `generate`/`Engine` (`Options`, mapped in `runtime_keywords`), never through the
environment. docs/benchmarks.md shows how to add a scenario.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .ceilings import Ceilings

COLUMNS = [
    "model", "scenario", "engine", "dtype", "status", "tok_s", "tok_s_prefill", "ttft_ms", "itl_p50_ms",
    "itl_p99_ms", "weight_gbps", "pct_bw", "speedup_hf", "speedup_ct2", "note",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
PAD_ID = 0

HF_EAGER = "HF generate (eager, sdpa)"
HF_FP32 = "HF fp32 generate (eager, sdpa)"
HF_STATIC = "HF static cache + compile"
REF_OPS = "gptfast eager reference ops"
REF_COMPILE = "eager ref + compile (reduce-overhead)"
GPTFAST = "gptfast"
GPTFAST_INT8 = "gptfast int8"
# the engine a CPU user would pick instead (optional: the `ctranslate2` extra), at the same weight
# precision as gptfast fp32 and gptfast int8
CT2_FP32 = "CTranslate2 float32"
CT2_INT8 = "CTranslate2 int8_float32"
# gptfast with generate() arguments that change the decode path (batch 1, timed beside greedy):
# sampling stays inside the CUDA graph; a repetition penalty stops the graph at the logits and
# runs the processor and the sampler eagerly (README, "The fast decode path").
GPTFAST_SAMPLED = "gptfast, sampling top_p=0.9"
GPTFAST_PENALTY = "gptfast, repetition_penalty=1.2"
GPTFAST_MIN_P = "gptfast, sampling min_p=0.05"
GPTFAST_NGRAM = "gptfast, no_repeat_ngram_size=3"
# gptfast with its small-batch decode step on the unfused kernels: the fused GEMV path's baseline
GPTFAST_UNFUSED = "gptfast, unfused decode step"
VARIANTS = {
    GPTFAST_SAMPLED: (dict(do_sample=True, top_k=0, top_p=0.9, seed=0),
                      "sampled inside the decode graph"),
    GPTFAST_PENALTY: (dict(repetition_penalty=1.2),
                      "graph stops at the logits; penalty and sampler run eagerly"),
    GPTFAST_MIN_P: (dict(do_sample=True, top_k=0, min_p=0.05, seed=0),
                    "graph stops at the logits; the filters (min_p after top-p) and sampler run eagerly"),
    GPTFAST_NGRAM: (dict(no_repeat_ngram_size=3),
                    "graph stops at the logits; n-gram bans from the row's history run eagerly"),
}


@dataclass
class Plan:
    """The sizes of one e2e run."""

    prompt_len: int  # batch-1 prompt length
    new_tokens: int  # batch-1 new tokens
    requests: list[tuple[int, int]]  # mixed set: (prompt length, output length) per request
    batch_size: int  # requests per padded batch in the mixed set
    repeats: int  # timed batch-1 runs per engine (median reported)
    mixed_repeats: int  # timed passes over the mixed set per engine (median reported)
    parity_tokens: int  # new tokens in the fp32 correctness check
    compile_refs: bool  # also time HF static cache + compile and the compiled eager reference (batch 1)
    notes: list[str] = field(default_factory=list)


def make_plan(device: str, quick: bool, n_positions: int, seed: int = 0) -> Plan:
    """CPU: batch 1 (32-token prompt, 32 new tokens; 16 with `quick`) and 8 requests of 5..120
    prompt tokens × 8..32 new tokens.
    CUDA: batch 1 (128-token prompt, 256 new; 128 with `quick`) and 256 requests (64 with `quick`)
    of prompt 16..512 and output 16..256 tokens in batches of 64 (32 with `quick`).
    Lengths are clipped to the model's context."""
    gen = torch.Generator().manual_seed(seed)
    if device.startswith("cuda"):
        n = 64 if quick else 256
        prompts = torch.randint(16, 513, (n,), generator=gen).tolist()
        outs = torch.randint(16, 257, (n,), generator=gen).tolist()
        plan = Plan(128, 128 if quick else 256, list(zip(prompts, outs)), 32 if quick else 64,
                    repeats=3, mixed_repeats=1, parity_tokens=16, compile_refs=not quick)
        if quick:
            plan.notes.append("HF static cache + torch.compile and the eager reference + torch.compile "
                              "skipped in --quick (compilation takes minutes)")
    else:
        prompts = torch.linspace(5, 120, 8).round().long().tolist()
        outs = torch.linspace(8, 32, 8).round().long()[torch.randperm(8, generator=gen)].tolist()
        plan = Plan(32, 16 if quick else 32, list(zip(prompts, outs)), 8,
                    repeats=1 if quick else 3, mixed_repeats=1,
                    parity_tokens=8 if quick else 16, compile_refs=False)
        plan.notes.append("HF static cache + torch.compile and the eager reference + torch.compile "
                          "skipped on the CPU (compile time dominates)")
    clip = []
    for p, o in plan.requests:
        p = min(p, n_positions - 1)
        clip.append((p, max(1, min(o, n_positions - p))))
    plan.requests = clip
    plan.prompt_len = min(plan.prompt_len, n_positions // 2)
    plan.new_tokens = min(plan.new_tokens, n_positions - plan.prompt_len)
    plan.parity_tokens = min(plan.parity_tokens, plan.new_tokens)
    return plan


class TimingStreamer:
    """A `generate(streamer=...)` object that timestamps every streamed token (batch 1).

    HF (and gptfast, which follows it) first `put`s the prompt, then one tensor per new token; the
    prompt is recognised by its size and not counted. `.cpu()` on each value waits for the device,
    so a timestamp is when the token is really there.
    """

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.times: list[float] = []
        self._prompt_skipped = False
        self.ended: float | None = None

    def put(self, value) -> None:
        n = value.cpu().numel() if isinstance(value, torch.Tensor) else len(value)
        self.stamp(n, time.perf_counter())

    def stamp(self, n: int, when: float) -> None:
        """`n` tokens arrived at `when` (a `time.perf_counter()` value, from any process of this
        machine); the prompt, first and recognised by its size, is not counted."""
        if not self._prompt_skipped and not self.times and n == self.prompt_len and n > 1:
            self._prompt_skipped = True
            return
        self.times.extend([when] * n)

    def end(self) -> None:
        self.ended = time.perf_counter()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------------ models
def hf_config(config) -> Any:
    """The `transformers.GPT2Config` of a gptfast `GPT2Config` (EOS disabled, SDPA attention)."""
    import transformers

    if not config.bias:
        raise ValueError("HF GPT-2 always has biases; the e2e suite needs a preset with bias=True")
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
        activation_function=_HF_ACTIVATIONS[config.activation],
        layer_norm_epsilon=config.layer_norm_epsilon, scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation="sdpa",
    )


def build_hf_model(model: str, seed: int) -> tuple[Any, str]:
    """An fp32 CPU `GPT2LMHeadModel` for a preset name (random, seeded) or a checkpoint folder,
    with EOS disabled; and a sentence saying where its weights came from."""
    import transformers

    from gptfast.config import PRESETS

    if model in PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = transformers.GPT2LMHeadModel(hf_config(PRESETS[model]))
        origin = (f"weights are RANDOMLY INITIALISED (GPT-2 init, seed {seed}) for preset {model!r} "
                  f"({hf.num_parameters() / 1e6:.1f}M parameters): speed is real, the text is noise")
    else:
        hf = transformers.GPT2LMHeadModel.from_pretrained(model, attn_implementation="sdpa",
                                                          dtype=torch.float32)
        origin = f"weights from checkpoint {model}"
    hf.config.eos_token_id = None
    hf.generation_config.eos_token_id = None
    return hf.eval(), origin


def _gptfast_api() -> tuple[Any, Callable]:
    """`gptfast.GPT2` and `gptfast.generate` (looked up when the suite runs)."""
    import gptfast

    return gptfast.GPT2, gptfast.generate


def weight_bytes_per_step(config, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied head included via wte),
    but only one row of the position table."""
    elsize = torch.empty((), dtype=dtype).element_size()
    return (config.num_params() - config.n_positions * config.n_embd + config.n_embd) * elsize


# ------------------------------------------------------------------------------ workloads
def _prompt(gen: torch.Generator, vocab: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=gen)


def request_prompts(requests: list[tuple[int, int]], vocab: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """The mixed set's prompts, in request order: [(prompt tokens [p], output length)]. The padded
    and the continuous-batching scenarios serve these same prompts."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [(_prompt(gen, vocab, p), o) for p, o in requests]


def _batch_plan(requests: list[tuple[int, int]], batch_size: int, n_positions: int):
    """The padded-batch plan, by request index: requests sorted by output length (longest first)
    in chunks of `batch_size`, each chunk with its max_new_tokens (the longest output, cut to what
    fits after the chunk's longest prompt: T + max_new_tokens <= n_positions)."""
    order = sorted(range(len(requests)), key=lambda i: -requests[i][1])
    plan = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(requests[i][0] for i in chunk)
        new = min(max(requests[i][1] for i in chunk), n_positions - width)
        if new < 1:
            raise ValueError(f"a prompt of {width} tokens leaves no room in a context of {n_positions}")
        plan.append((chunk, width, new))
    return plan


def padded_batches(requests: list[tuple[int, int]], batch_size: int, vocab: int, n_positions: int, seed: int):
    """Requests sorted by output length (longest first) in left-padded batches:
    [(input_ids [b, T], attention_mask [b, T], max_new_tokens, useful tokens)].

    Every row of a batch generates the batch's longest output, so max_new_tokens is cut to what
    fits after the batch's longest prompt (T + max_new_tokens <= n_positions); a request's useful
    tokens are its output length within that."""
    prompts = request_prompts(requests, vocab, seed)
    batches = []
    for chunk, width, new in _batch_plan(requests, batch_size, n_positions):
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            p = prompts[i][0]
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        batches.append((ids, mask, new, sum(min(requests[i][1], new) for i in chunk)))
    return batches


def served_requests(requests: list[tuple[int, int]], batch_size: int, vocab: int, n_positions: int,
                    seed: int) -> list[tuple[list[int], int]]:
    """The same requests as `padded_batches`, in request order, each with the output length it
    gets there (so continuous batching serves exactly the padded batches' useful tokens)."""
    prompts = request_prompts(requests, vocab, seed)
    cap = {i: new for chunk, _, new in _batch_plan(requests, batch_size, n_positions) for i in chunk}
    return [(p.tolist(), min(o, cap[i])) for i, (p, o) in enumerate(prompts)]


def _first_mismatch(expected: torch.Tensor, got: torch.Tensor, prompt_width: int) -> str | None:
    """None when equal, else where the first differing token is."""
    if expected.shape != got.shape:
        return f"output shape {tuple(got.shape)} != HF's {tuple(expected.shape)}"
    diff = (expected != got).nonzero()
    if diff.numel() == 0:
        return None
    row, col = diff[0].tolist()
    return (f"{len(diff)} tokens differ; first at row {row}, new token {col - prompt_width}: "
            f"gptfast {got[row, col].item()}, HF {expected[row, col].item()}")


# fp32 logits this close are a tie: a different summation order may pick either token, and the
# sequences then diverge legitimately. Anything further apart is a real mismatch.
TIE_TOL = 1e-4


def _near_tie(hf, mask: torch.Tensor, expected: torch.Tensor, got: torch.Tensor, device: str) -> str | None:
    """A note when the first mismatch is a tie in HF's own fp32 logits, else None."""
    row, col = (expected != got).nonzero()[0].tolist()
    prefix = expected[row:row + 1, :col]  # everything before the differing token
    m = torch.cat([mask[row:row + 1].cpu(), torch.ones(1, col - mask.shape[1], dtype=mask.dtype)], dim=1)
    positions = (m.cumsum(-1) - 1).clamp_min(0)  # as HF's generate counts them
    with torch.inference_mode():
        logits = hf(prefix.to(device), attention_mask=m.to(device),
                    position_ids=positions.to(device)).logits[0, -1].float().cpu()
    a, b = logits[expected[row, col]].item(), logits[got[row, col]].item()
    if abs(a - b) <= TIE_TOL * max(1.0, abs(a)):
        return (f"near-tie at row {row}, new token {col - mask.shape[1]}: HF's fp32 logits "
                f"{a:.7g} (HF's token) vs {b:.7g} (gptfast's)")
    return None


# ------------------------------------------------------------------------------ gptfast's options
@dataclass(frozen=True)
class Options:
    """How a gptfast contender runs. None keeps gptfast's own default (the environment's value,
    read by `gptfast.settings`), so the plain contender calls gptfast exactly as a user does."""

    kernels: str | None = None  # the op backend: "auto", "triton" or "reference"
    cuda_graphs: bool | None = None  # the decode step replayed as CUDA graphs
    # False: decode steps of 1-8 rows take the unfused kernels (cuBLAS GEMMs with fused epilogues)
    # instead of the fused GEMV step (`gptfast.model._GemvStages`)
    gemv_decode: bool | None = None


def runtime_keywords(options: Options) -> dict[str, Any]:
    """The keywords that give `gptfast.generate(...)` and `gptfast.Engine(...)` these options.

    NOTE: the one place the suite maps its options onto gptfast's arguments; only the options set
    are passed, so the default contender's call is a user's call.
    """
    names = {"kernels": options.kernels, "cuda_graphs": options.cuda_graphs, "gemv_decode": options.gemv_decode}
    return {name: value for name, value in names.items() if value is not None}


def resolved_options(options: Options):
    """The `gptfast.settings.RuntimeOptions` a contender with `options` runs with (the
    environment's values where `options` leaves them None), as its Engine resolves them."""
    from gptfast.settings import RuntimeOptions

    return RuntimeOptions.with_defaults(kernels=options.kernels, cuda_graphs=options.cuda_graphs,
                                        gemv_decode=options.gemv_decode)


def graphs_replayed(options: Options) -> bool:
    """Whether a gptfast contender with `options` replays its decode step as CUDA graphs on a CUDA
    model, as its Engine decides it (`RuntimeOptions.use_graphs`)."""
    try:
        return resolved_options(options).use_graphs("cuda")
    except ValueError:  # graphs asked for with the reference ops: the contender fails on its own
        return False


# `(input_ids [b, T], attention_mask [b, T], max_new_tokens, streamer=None) -> output [b, T + new]`:
# how every contender generates
Generate = Callable[..., torch.Tensor]
Tick = Callable[[str], None]


def _hf_generate(hf, device: str) -> Generate:
    def generate(ids, mask, new, streamer=None, **extra):
        return hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           do_sample=False, pad_token_id=PAD_ID, streamer=streamer, **extra)

    return generate


def _gptfast_generate(generate, model, device: str, options: Options, **arguments) -> Generate:
    """`generate(model, ...)` (gptfast.generate) as a contender: greedy unless `arguments` say
    otherwise, with `options` (see `runtime_keywords`)."""
    keywords = dict(runtime_keywords(options), **arguments)
    keywords.setdefault("do_sample", False)

    def call(ids, mask, new, streamer=None):
        # NOTE: every run computes its prompt: K/V cached by an earlier run of the same prompt
        # would be a prefill HF does not get to skip
        model.kv_cache.reset_prefix_cache()
        return generate(model, input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                        pad_token_id=PAD_ID, streamer=streamer, **keywords)

    return call


def _static_compiled(gpt_model, max_len: int) -> Generate:
    """`generate` of the eager reference (`static_ref`) compiled with mode="reduce-overhead",
    built on first call (the first call compiles) for that call's batch size."""
    built: dict[str, Any] = {}

    def generate(ids, mask, new, streamer=None):
        if not bool(mask.all()):
            raise ValueError("the static-cache reference takes prompts without padding")
        if "gen" not in built:
            from .static_ref import StaticCacheGenerator

            built["gen"] = StaticCacheGenerator(gpt_model, batch_size=ids.shape[0], max_len=max_len,
                                                compile=True, mode="reduce-overhead")
        return built["gen"].generate(ids, new, streamer=streamer)

    return generate


def _placeholder_vocab(folder, vocab_size: int) -> None:
    """A GPT-2 tokenizer (vocab.json + merges.txt) naming ids `t0`, `t1`, ... and the last id
    `<|endoftext|>`, for a checkpoint without one: CTranslate2's converter builds its vocabulary
    from the tokenizer, and the suite feeds token ids, never text."""
    import json
    from pathlib import Path

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    Path(folder, "vocab.json").write_text(json.dumps(vocab))
    Path(folder, "merges.txt").write_text("#version: 0.2\n")


def ctranslate2_generators(hf, model: str, workdir, threads: int) -> tuple[dict[str, Generate], str]:
    """CTranslate2 generators for the HF model `hf`, converted with CTranslate2's own converter
    to float32 and int8_float32, as contenders by name (greedy, EOS never ends a run early); and a
    note. ({}, why) when ctranslate2 is not installed or its process failed to start.

    CTranslate2 runs in a worker process of its own (`gptfast.bench.ct2_worker`: in this process
    its OpenMP runtime would slow every PyTorch contender timed after it); the generators talk to
    it over pipes, and it exits when they are all collected.

    Parameters
    ----------
    hf : transformers.GPT2LMHeadModel (fp32, CPU): the weights every engine runs.
    model : the suite's model argument (a checkpoint folder's tokenizer is reused).
    workdir : a folder for the HF copy and the converted models (read while this call runs only).
    threads : CTranslate2's intra-op threads (gptfast's and HF's: torch's thread count).
    """
    import importlib.util

    if importlib.util.find_spec("ctranslate2") is None:
        return {}, ("CTranslate2 not installed: its rows are skipped (pip install 'gptfast[ctranslate2]' "
                    "adds it)")
    import shutil
    from pathlib import Path

    from gptfast.tokenizer import has_tokenizer_files

    src = Path(workdir, "hf")
    hf.save_pretrained(src)
    if Path(model).is_dir() and has_tokenizer_files(model):
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                     "special_tokens_map.json"):
            if Path(model, name).is_file():
                shutil.copy(Path(model, name), src / name)
    else:
        _placeholder_vocab(src, hf.config.vocab_size)
    models = [(CT2_FP32, "float32"), (CT2_INT8, "int8_float32")]
    try:
        worker = _CT2Process(str(src), str(workdir), models, threads)
    except RuntimeError as exc:
        return {}, f"CTranslate2 rows skipped: {exc}"
    generators = {name: _ct2_generate(worker, name) for name, _ in models}
    note = (f"CTranslate2 {worker.version} (converted from the same HF weights by "
            f"ctranslate2.converters.TransformersConverter; {threads} intra-op threads, as torch's; in a "
            f"process of its own, see gptfast/bench/ct2_worker.py): {CT2_FP32} beside gptfast fp32, "
            f"{CT2_INT8} beside {GPTFAST_INT8}")
    return generators, note


class _CT2Process:
    """The CTranslate2 worker process (`python -m gptfast.bench.ct2_worker`) and its two pipes. It
    is told to exit when this object is collected (and exits by itself when the pipes close)."""

    START_TIMEOUT_S = 900  # conversion and loading of both models
    CALL_TIMEOUT_S = 900  # one generate call

    def __init__(self, src: str, workdir: str, models: list[tuple[str, str]], threads: int):
        import os
        import subprocess
        import sys
        import weakref
        from multiprocessing.connection import Connection

        to_child, from_parent = os.pipe()[::-1]  # (write end, read end)
        from_child, to_parent = os.pipe()
        self.process = subprocess.Popen([sys.executable, "-m", "gptfast.bench.ct2_worker", str(from_parent),
                                         str(to_parent)], pass_fds=(from_parent, to_parent))
        os.close(from_parent)
        os.close(to_parent)
        self.requests = Connection(to_child, readable=False)
        self.replies = Connection(from_child, writable=False)
        weakref.finalize(self, _CT2Process._stop, self.requests, self.replies, self.process)
        self.requests.send((src, workdir, models, threads))
        status, *payload = self._receive(self.START_TIMEOUT_S)
        if status != "ready":
            raise RuntimeError(f"its worker process failed to start: {payload[0]}")
        self.version = payload[0]

    def _receive(self, timeout: float) -> tuple:
        try:
            if self.replies.poll(timeout):
                return self.replies.recv()
        except EOFError:
            pass
        else:
            self.process.kill()
            raise RuntimeError(f"the CTranslate2 worker process did not answer within {timeout:.0f} s")
        raise RuntimeError(f"the CTranslate2 worker process exited (code {self.process.poll()})")

    def generate(self, name: str, rows: list[list[int]], new: int, stream: bool) -> tuple[list[list[int]], list[float]]:
        """New token ids per row and, when `stream`, a `time.perf_counter()` stamp per step."""
        self.requests.send((name, rows, new, stream))
        status, *payload = self._receive(self.CALL_TIMEOUT_S)
        if status != "ok":
            raise RuntimeError(f"CTranslate2 failed: {payload[0]}")
        return payload[0], payload[1]

    @staticmethod
    def _stop(requests, replies, process) -> None:
        try:
            requests.send(None)
        except (OSError, ValueError):  # already closed
            pass
        requests.close()
        replies.close()
        try:
            process.wait(timeout=10)
        except Exception:
            process.kill()
            process.wait()


def _ct2_generate(worker: _CT2Process, name: str) -> Generate:
    """A contender's generate over the worker's generator `name`: each row's prompt without its
    padding, greedy, exactly `new` tokens (min_length), the output shaped like HF's (prompt + new);
    a streamer gets the prompt, then each step's token with the worker's timestamp."""

    def generate(ids, mask, new, streamer=None):
        rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        if streamer is not None:
            streamer.put(ids[0])  # the prompt first, as HF's generate does
        tokens, stamps = worker.generate(name, rows, new, stream=streamer is not None)
        if streamer is not None:
            for when in stamps:
                streamer.stamp(1, when)
            streamer.end()
        return torch.cat([ids.cpu(), torch.tensor(tokens, dtype=ids.dtype)], dim=1)

    return generate


def _each(live: dict[str, Generate], results: dict, fn: Callable[[str, Generate, dict], None],
          tick: Tick | None = None) -> None:
    """`fn(name, generate, its result dict)` for each live contender; one that raises is recorded
    and dropped. `tick(name)` after each run moves the progress bar."""
    for name, generate in list(live.items()):
        try:
            fn(name, generate, results[name])
        except Exception as exc:
            results[name] = exc
            del live[name]
        if tick is not None:
            tick(name)


def _timed(device: str, call: Callable[[], Any]) -> tuple[float, float]:
    """(start, seconds) of `call()`, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    call()
    _sync(device)
    return t0, time.perf_counter() - t0


def _batch1(entrants: dict[str, Generate], prompt: torch.Tensor, new: int, repeats: int, device: str,
            tick: Tick | None = None) -> dict:
    """Batch 1, engines interleaved run by run (so a burst of load on a shared machine hits all of
    them): a warm-up each, `repeats` rounds of plain runs (tokens/s with prefill: no streamer, no
    per-token host sync), then `repeats` rounds of streamed runs (TTFT, decode tokens/s, ITL).

    Returns {contender name: result dict, or the exception that contender raised}.
    """
    ids, mask = prompt[None], torch.ones_like(prompt)[None]
    results: dict[str, Any] = {name: dict(plain=[], runs=[], gaps=[]) for name in entrants}
    live = dict(entrants)
    _each(live, results, lambda name, gen, r: r.update(output=gen(ids, mask, new).cpu()), tick)

    def plain(name: str, gen: Generate, r: dict) -> None:
        r["plain"].append(_timed(device, lambda: gen(ids, mask, new))[1])

    def streamed(name: str, gen: Generate, r: dict) -> None:
        streamer = TimingStreamer(len(prompt))
        t0, _ = _timed(device, lambda: gen(ids, mask, new, streamer))
        stamps = streamer.times
        if len(stamps) != new:
            raise RuntimeError(f"{name} streamed {len(stamps)} tokens, expected {new}")
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        r["runs"].append(dict(tok_s=decode, ttft_ms=(stamps[0] - t0) * 1e3))
        r["gaps"] += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]

    for _ in range(repeats):
        _each(live, results, plain, tick)
    for _ in range(repeats):
        _each(live, results, streamed, tick)
    for name in live:
        r = results[name]
        runs = r.pop("runs")
        out = {k: statistics.median(x[k] for x in runs) if runs[0][k] is not None else None for k in runs[0]}
        gaps = r.pop("gaps")
        plain_s = r.pop("plain")
        if len(plain_s) > 1:  # repeat-to-repeat spread of the same run: how far to trust the row
            out["noise_pct"] = (max(plain_s) - min(plain_s)) / min(plain_s) * 100
        out.update(tok_s_prefill=new / statistics.median(plain_s), itl_p50_ms=_percentile(gaps, 0.5),
                   itl_p99_ms=_percentile(gaps, 0.99), output=r["output"])
        results[name] = out
    return results


def _mixed(entrants: dict[str, Generate], batches, repeats: int, device: str, tick: Tick | None = None) -> dict:
    """The mixed set in padded batches: a warm-up each on the first batch (2 tokens, or what fits),
    then `repeats` rounds, each contender serving every batch in turn. Returns {contender name:
    result dict or exception}."""
    results: dict[str, Any] = {name: dict(times=[]) for name in entrants}
    live = dict(entrants)
    ids, mask, fits, _ = batches[0]
    _each(live, results, lambda name, gen, r: gen(ids, mask, min(2, fits)), tick)

    def serve(name: str, gen: Generate, r: dict) -> None:
        r["times"].append(_timed(device, lambda: [gen(i, m, n) for i, m, n, _ in batches])[1])

    for _ in range(repeats):
        _each(live, results, serve, tick)
    useful = sum(b[3] for b in batches)
    generated = sum(b[0].shape[0] * b[2] for b in batches)
    for name in live:
        t = statistics.median(results[name]["times"])
        results[name] = dict(tok_s=useful / t, total_s=t, useful_tokens=useful, generated_tokens=generated)
    return results


def serve_continuous(model, requests: list[tuple[list[int], int]], device: str, options: Options = Options()) -> dict:
    """Serve every request at once through one `gptfast.Engine` (continuous batching), greedy,
    EOS disabled, and time it end to end (engine creation and `add`s included).

    Parameters
    ----------
    model : gptfast.GPT2
    requests : list of (prompt token ids, new tokens)
    device : str
        The model's device (synchronised before the clock starts).
    options : Options
        The engine's runtime options (see `runtime_keywords`).

    Returns
    -------
    dict: tokens (list of each request's new tokens, in request order), seconds, ttft_s (per
    request: from the start until its first token is back on the host), gaps_s (every
    inter-token gap of every request), steps, preemptions (None when the engine keeps no count).
    """
    from gptfast.engine import Engine, SamplingParams

    model.kv_cache.reset_prefix_cache()  # no prompt K/V left from earlier runs (HF has none)
    _sync(device)
    t0 = time.perf_counter()
    engine = Engine(model, **runtime_keywords(options))
    ids = [engine.add(list(prompt), SamplingParams(max_new_tokens=n), seeds=[i])[0]
           for i, (prompt, n) in enumerate(requests)]
    tokens: dict[int, list[int]] = {sid: [] for sid in ids}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    gaps: list[float] = []
    steps = 0
    while engine.has_unfinished():
        steps += 1
        outs = engine.step()
        now = time.perf_counter()  # step() returns after the tokens reached the host
        for o in outs:
            tokens[o.seq_id].append(o.token)
            if o.seq_id in last:
                gaps.append(now - last[o.seq_id])
            else:
                first[o.seq_id] = now - t0
            last[o.seq_id] = now
    seconds = time.perf_counter() - t0
    return dict(tokens=[tokens[sid] for sid in ids], seconds=seconds, ttft_s=[first[sid] for sid in ids],
                gaps_s=gaps, steps=steps, preemptions=getattr(engine, "num_preemptions", None))


def _continuous(model, requests: list[tuple[list[int], int]], repeats: int, device: str,
                tick: Tick | None = None, options: Options = Options()) -> dict:
    """The mixed set through continuous batching: a warm-up pass (every prompt, 4 new tokens at
    most: compiles the kernels, captures the CUDA graphs), then `repeats` timed passes; the
    median pass's numbers."""
    tick = tick or (lambda name: None)
    serve_continuous(model, [(p, min(n, 4)) for p, n in requests], device, options)
    tick(GPTFAST)
    runs = []
    for _ in range(repeats):
        runs.append(serve_continuous(model, requests, device, options))
        tick(GPTFAST)
    runs.sort(key=lambda r: r["seconds"])
    run = runs[len(runs) // 2]
    useful = sum(n for _, n in requests)
    got = sum(len(t) for t in run["tokens"])
    if got != useful:
        raise RuntimeError(f"continuous batching produced {got} tokens, expected {useful}")
    gaps_ms = [g * 1e3 for g in run["gaps_s"]]
    ttft_ms = [t * 1e3 for t in run["ttft_s"]]
    return dict(tok_s=useful / run["seconds"], total_s=run["seconds"], useful_tokens=useful,
                ttft_ms=_percentile(ttft_ms, 0.5), ttft_p99_ms=_percentile(ttft_ms, 0.99),
                itl_p50_ms=_percentile(gaps_ms, 0.5), itl_p99_ms=_percentile(gaps_ms, 0.99),
                steps=run["steps"], preemptions=run["preemptions"])


def cuda_step_facts(model, options: Options = Options()) -> tuple[dict, list[str]]:
    """On CUDA: the kernels one decode step launches at batch 1 and the CUDA-graph capture time,
    as row fields and note lines, for a contender with `options`. Failures become notes (they
    never fail the suite)."""
    config = model.config
    fields: dict[str, Any] = {}
    notes: list[str] = []
    graphs_on = graphs_replayed(options)
    if graphs_on:
        try:
            from gptfast import graphs, ops

            resolved = resolved_options(options)
            # NOTE: in the contender's op context, so this is the runner it ran on (one per op set)
            with ops.backend(resolved.kernels, resolved.gemv_decode):
                runner = graphs.graph_runner(model)
            fields["graph_capture_s"] = runner.capture_seconds
            captured = {v: runner.buckets_captured(v) for v in ("sample", "greedy", "logits")}
            shown = ", ".join(f"{v} {b}" for v, b in captured.items() if b)
            notes.append(f"CUDA graphs captured on first use: {shown or 'none'}, in "
                         f"{runner.capture_seconds:.2f} s (each graph's warm-up step included), "
                         f"{runner.num_replays} replays in this run")
        except Exception as exc:  # the runner is optional for the suite
            notes.append(f"CUDA-graph capture time unavailable: {type(exc).__name__}: {exc}"[:300])
    else:
        notes.append("CUDA graphs off (GPTFAST_CUDA_GRAPHS=0 or cuda_graphs=False): no capture time")
    try:
        from .kernel_count import kernels_per_decode_step

        eager = kernels_per_decode_step(model, batch_size=1, graphs=False)
        fields.update(kernels_per_step=eager["kernels"], launch_calls_per_step=eager["launch_calls"])
        top = ", ".join(f"{name} ×{n}" for name, n in eager["top"])
        notes.append(f"decode step at batch 1, eager (CUDA graphs off, every launch shows): {eager['kernels']} "
                     f"kernels, {eager['copies']} memcpy/memset, {eager['launch_calls']} host launch calls; "
                     f"most frequent: {top}")
        if graphs_on:
            # the headline: what the runtime replays (the graph holds the fused path's kernels)
            replay = kernels_per_decode_step(model, batch_size=1, graphs=True)
            fields.update(kernels_per_step=replay["kernels"], kernels_per_step_eager=eager["kernels"],
                          launch_calls_per_step_graphs=replay["launch_calls"],
                          replay_kernel_us=replay["kernel_us"], replay_kernel_sum_us=replay["kernel_sum_us"],
                          replay_span_us=replay["device_span_us"])
            longest = ", ".join(f"{name[:40]} {us:.1f}" for name, us in replay["kernel_us"][:5])
            span = replay["device_span_us"]
            notes.append(f"decode step at batch 1 through the CUDA graph: {replay['kernels']} kernels "
                         f"({replay['kernels_per_layer']:.1f} per layer of {config.n_layer}) from "
                         f"{replay['launch_calls']} host launch calls; kernel device time "
                         f"{replay['kernel_sum_us']:.1f} µs of a {span:.1f} µs replay (first kernel start to "
                         f"last end; the rest is gaps between kernels); longest µs: {longest}")
    except Exception as exc:
        notes.append(f"kernel count failed: {type(exc).__name__}: {exc}"[:300])
    return fields, notes


def _agreement(reference: torch.Tensor, got: torch.Tensor) -> int:
    """How many leading tokens of `got` equal `reference`."""
    n = min(len(reference), len(got))
    same = (reference[:n] == got[:n]).tolist()
    return n if all(same) else same.index(False)


# ------------------------------------------------------------------------------ one run
@dataclass
class Run:
    """What one (model, dtype) run's contenders and scenarios share."""

    model: str  # the preset or checkpoint folder, as given
    device: str
    dtype: str  # "fp32", "bf16" or "fp16": the dtype timed
    plan: Plan
    config: Any  # gptfast.GPT2Config
    hf: Any  # transformers.GPT2LMHeadModel in `dtype`, on `device`
    hf32: Any  # an fp32 copy on the CPU when `dtype` is lower (the CPU target is stated against it), else None
    gpt: Any  # gptfast.GPT2 in `dtype`, on `device`
    generate: Callable  # gptfast.generate
    prompt: torch.Tensor  # the batch-1 prompt [prompt_len]
    batches: list  # `padded_batches` of the mixed set
    requests: list  # `served_requests` of the mixed set
    reference_tokens: torch.Tensor  # HF's fp32 greedy new tokens for `prompt` (the check's)
    ceilings: Ceilings | None
    notes: list[str]
    log: Callable[[str], None] = print
    shared: dict = field(default_factory=dict)  # what several contenders build once (CTranslate2)


# ------------------------------------------------------------------------------ contenders
@dataclass(frozen=True)
class Contender:
    """An engine the suite times. `build(run, contender)` gives its generate for that run, or None
    when it takes no part in it (wrong device, dtype or plan)."""

    name: str
    build: Callable[[Run, "Contender"], Generate | None]
    status: str = "ref"  # its rows' status: "PASS" (gptfast, checked against HF), "ref", "timed" (not greedy)
    precision: str | None = None  # its rows' weight precision ("fp32", "int8"); None: the run's dtype
    batch1_only: bool = False  # a static cache has one batch shape; a variant only shows its path's cost
    optional: bool = False  # a failure makes its row SKIP (needs torch.compile), not ERROR
    named_only: bool = False  # timed only by the scenarios that name it
    options: Options = Options()  # gptfast's runtime options (gptfast contenders)
    path: str = ""  # what its decode step does on CUDA (a note on its rows)


Build = Callable[[Run, Contender], "Generate | None"]


def _gptfast(**arguments) -> Build:
    """gptfast.generate with the contender's options and `arguments` (generate()'s)."""
    return lambda run, c: _gptfast_generate(run.generate, run.gpt, run.device, c.options, **arguments)


def _on_cuda(build: Build) -> Build:
    return lambda run, c: build(run, c) if run.device.startswith("cuda") else None


def _compiled(build: Build) -> Build:
    return lambda run, c: build(run, c) if run.plan.compile_refs else None


def _hf_eager(run: Run, contender: Contender) -> Generate:
    return _hf_generate(run.hf, run.device)


def _hf_fp32(run: Run, contender: Contender) -> Generate | None:
    return None if run.hf32 is None else _hf_generate(run.hf32, "cpu")


def _hf_static(run: Run, contender: Contender) -> Generate:
    gen = _hf_generate(run.hf, run.device)
    return lambda ids, mask, new, streamer=None: gen(ids, mask, new, streamer, cache_implementation="static")


def _cpu_fp32(run: Run) -> bool:
    """gptfast int8 and CTranslate2 run in the CPU fp32 runs (the weight precisions they share)."""
    return run.device == "cpu" and run.dtype == "fp32"


def _static_reference(run: Run, contender: Contender) -> Generate:
    return _static_compiled(run.gpt, run.plan.prompt_len + run.plan.new_tokens)


def _gptfast_int8(run: Run, contender: Contender) -> Generate | None:
    if not _cpu_fp32(run):
        return None
    model8 = type(run.gpt).from_pretrained(run.hf, quantize="int8")
    return _gptfast_generate(run.generate, model8, run.device, contender.options)


def _ctranslate2(name: str) -> Build:
    def build(run: Run, contender: Contender) -> Generate | None:
        if not _cpu_fp32(run):
            return None
        if "ct2" not in run.shared:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # the generators hold their weights in memory
                generators, note = ctranslate2_generators(run.hf, run.model, tmp, torch.get_num_threads())
            run.shared["ct2"] = generators
            run.notes.append(note)
            run.log(f"e2e: {note}")
        return run.shared["ct2"].get(name)

    return build


# The contenders, in table order.
CONTENDERS: list[Contender] = [
    Contender(HF_EAGER, _hf_eager),
    Contender(HF_FP32, _hf_fp32, precision="fp32"),
    Contender(HF_STATIC, _compiled(_hf_static), batch1_only=True, optional=True),
    # gptfast's own eager path (every op through its PyTorch reference, launched one by one): what
    # the kernels and the CUDA graphs gain over eager PyTorch inside the same runtime (on the CPU
    # that is gptfast itself, so it is left out there)
    Contender(REF_OPS, _on_cuda(_gptfast()), options=Options(kernels="reference", cuda_graphs=False)),
    Contender(REF_COMPILE, _compiled(_static_reference), batch1_only=True, optional=True),
    Contender(GPTFAST, _gptfast(), status="PASS"),
    *(Contender(name, _gptfast(**arguments), status="timed", batch1_only=True, path=path)
      for name, (arguments, path) in VARIANTS.items()),
    Contender(GPTFAST_INT8, _gptfast_int8, precision="int8"),
    Contender(CT2_FP32, _ctranslate2(CT2_FP32), precision="fp32"),
    Contender(CT2_INT8, _ctranslate2(CT2_INT8), precision="int8"),
    # the decode step of 1-8 rows without the fused GEMV kernels: what the fused path gains
    Contender(GPTFAST_UNFUSED, _on_cuda(_gptfast()), options=Options(gemv_decode=False), named_only=True,
              path="decode steps of 1-8 rows on the unfused kernels (cuBLAS GEMMs with fused epilogues)"),
]
BY_NAME = {c.name: c for c in CONTENDERS}

# Row fields comparing two contenders of one scenario at the same weight precision:
# (field, contender, the one it is measured against); each adds "N.NNx <other>" to the note.
COMPARISONS = [
    ("speedup_compile", GPTFAST, REF_COMPILE),
    ("speedup_ct2", GPTFAST, CT2_FP32),
    ("speedup_ct2", GPTFAST_INT8, CT2_INT8),
    ("speedup_unfused", GPTFAST, GPTFAST_UNFUSED),
]


# ------------------------------------------------------------------------------ scenarios
# A scenario's `measure(run, {name: generate}, tick)` returns {contender name: row fields (tok_s,
# ..., note) or the exception it raised}; `tick(name)` after each generate() run.


def _greedy_batch1(run: Run, entrants: dict[str, Generate], tick: Tick) -> dict:
    """Batch 1 timed (see `_batch1`), each row's note saying how far its greedy tokens agree with
    HF's (fp32, and HF's in this dtype) or, for a sampling variant, what its decode path does."""
    timed = _batch1(entrants, run.prompt, run.plan.new_tokens, run.plan.repeats, run.device, tick)
    hf_tokens = None  # HF's batch-1 output in this dtype, to compare the others with
    for name, r in timed.items():
        if isinstance(r, Exception):
            continue
        tokens = r.pop("output")[0, run.plan.prompt_len:]
        contender = BY_NAME[name]
        if contender.status == "timed":
            # not greedy: nothing to compare tokens with (tests/test_generate_graphs.py checks
            # these paths against HF); the row is the cost of the path
            r["note"] = contender.path if run.device.startswith("cuda") else "CPU: every step eager (no graphs)"
            continue
        reference = run.reference_tokens
        agree = [f"first {_agreement(reference, tokens)}/{len(reference)} tokens = HF fp32"]
        if name == HF_EAGER:
            hf_tokens = tokens
        elif hf_tokens is not None:
            agree.append(f"{_agreement(hf_tokens, tokens)}/{len(tokens)} = HF {run.dtype}")
        r["note"] = "greedy: " + ", ".join(agree) + (f"; {contender.path}" if contender.path else "")
    return timed


def measure_batch1(run: Run, entrants: dict[str, Generate], tick: Tick) -> dict:
    """Batch 1, every contender; then, on CUDA, the kernels of gptfast's decode step and where
    its time goes (the most revealing figures, right after batch 1)."""
    results = _greedy_batch1(run, entrants, tick)
    fast = results.get(GPTFAST)
    if run.device.startswith("cuda") and isinstance(fast, dict):
        fields, notes = cuda_step_facts(run.gpt, BY_NAME[GPTFAST].options)
        if "kernels_per_step" in fields:
            fast["note"] += f"; {fields['kernels_per_step']} kernels/decode step"
        if "graph_capture_s" in fields:
            fast["note"] += f"; CUDA graphs captured in {fields['graph_capture_s']:.1f} s"
        fast.update(fields)
        run.notes += notes
    return results


def measure_padded(run: Run, entrants: dict[str, Generate], tick: Tick) -> dict:
    """The mixed set in left-padded batches (HF style; the same batches for every contender)."""
    results = _mixed(entrants, run.batches, run.plan.mixed_repeats, run.device, tick)
    for r in results.values():
        if not isinstance(r, Exception):
            r["note"] = (f"{r['useful_tokens']} useful of {r['generated_tokens']} generated tokens "
                         f"in {r['total_s']:.2f} s")
    return results


def measure_continuous(run: Run, entrants: dict[str, Generate], tick: Tick) -> dict:
    """The mixed set through gptfast's `Engine` API, every request at once (continuous batching)."""
    results = {}
    for name in entrants:
        r = _continuous(run.gpt, run.requests, run.plan.mixed_repeats, run.device, tick, BY_NAME[name].options)
        r["note"] = (f"all {len(run.requests)} requests at t=0 through the Engine API: {r['useful_tokens']} "
                     f"tokens in {r['total_s']:.2f} s, {r['steps']} steps, {r['preemptions']} preemptions; "
                     f"TTFT p50/p99 {r['ttft_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms (queueing included); "
                     "× HF is over HF's padded batches")
        results[name] = r
    return results


def _needs_cuda(what: str) -> Callable[[Run], str | None]:
    return lambda run: None if run.device.startswith("cuda") else f"{what}: CUDA only, skipped on the CPU"


@dataclass(frozen=True)
class Scenario:
    """A workload every contender it `takes` is timed on, one row each."""

    name: str
    label: Callable[[Plan], str]  # the rows' scenario column
    measure: Callable[[Run, dict[str, Generate], Tick], dict]
    runs: Callable[[Plan, int], int]  # generate() runs it makes for n contenders (the progress bar)
    takes: Callable[[Contender], bool] = lambda c: not c.named_only
    hf_from: str | None = None  # the scenario whose HF row "× HF" is over (None: its own)
    # tok/s is decode steps/s at batch 1: its rows get weight GB/s and % of the copy bandwidth
    bandwidth: bool = False
    skip: Callable[[Run], str | None] = lambda run: None  # why it does not run here (a note), else None


def _batch1_label(plan: Plan) -> str:
    return f"batch 1, {plan.prompt_len}+{plan.new_tokens} tok"


# The scenarios, in the order they run (a run cut short keeps the rows of those done).
SCENARIOS: list[Scenario] = [
    Scenario("batch1", _batch1_label, measure_batch1, lambda plan, n: n * (1 + 2 * plan.repeats),
             bandwidth=True),
    Scenario("padded", lambda plan: f"mixed: {len(plan.requests)} req, padded batches of {plan.batch_size}",
             measure_padded, lambda plan, n: n * (1 + plan.mixed_repeats),
             takes=lambda c: not c.named_only and not c.batch1_only),
    Scenario("continuous", lambda plan: f"mixed: {len(plan.requests)} req, continuous batching",
             measure_continuous, lambda plan, n: n * (1 + plan.mixed_repeats),
             takes=lambda c: c.name == GPTFAST, hf_from="padded"),
    Scenario("decode_path", lambda plan: f"decode path, {_batch1_label(plan)}", _greedy_batch1,
             lambda plan, n: n * (1 + 2 * plan.repeats), takes=lambda c: c.name in (GPTFAST, GPTFAST_UNFUSED),
             bandwidth=True,
             skip=_needs_cuda("the fused decode step (GEMV kernels) against the unfused one (on the CPU every "
                              "op runs its eager reference: there is no fused path to compare)")),
]


# ------------------------------------------------------------------------------ rows
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def build_rows(run: Run, measured: dict[str, dict]) -> list[dict]:
    """The result rows of the scenarios measured so far, in scenario then contender order, with
    the comparisons (× HF, `COMPARISONS`) between rows."""
    rows: list[dict] = []
    labels = {s.name: s.label(run.plan) for s in SCENARIOS}
    for scenario in SCENARIOS:
        label = labels[scenario.name]
        got = measured.get(scenario.name, {})
        for contender in [c for c in CONTENDERS if c.name in got]:
            name, result = contender.name, got[contender.name]
            dtype = contender.precision or run.dtype
            row = dict(suite="e2e", key=f"{run.model} | {label} | {name} | {dtype}", model=run.model,
                       scenario=label, engine=name, dtype=dtype, status=contender.status, primary="tok_s",
                       higher_is_better=True)
            if isinstance(result, Exception):
                row.update(status="SKIP" if contender.optional else "ERROR", note=_error_note(result))
            else:
                row.update(result)  # NOTE: a copy: the rows are built again after every scenario
                if scenario.bandwidth and row.get("tok_s"):
                    bytes_per_step = weight_bytes_per_step(run.config, _PRECISIONS[dtype])
                    row["weight_gbps"] = bytes_per_step * row["tok_s"] / 1e9
                    if run.ceilings is not None:
                        row["pct_bw"] = row["weight_gbps"] / run.ceilings.copy_gbps * 100
            rows.append(row)
    _compare(rows, {labels[s.name]: labels[s.hf_from or s.name] for s in SCENARIOS})
    return rows


def _compare(rows: list[dict], hf_scenario: dict[str, str]) -> None:
    """Each timed row's `speedup_hf` (over HF eager in `hf_scenario[its scenario]`; HF fp32, where
    timed, in the note) and the `COMPARISONS` fields."""
    speed = {(r["scenario"], r["engine"]): r.get("tok_s") for r in rows}
    dtype = {(r["scenario"], r["engine"]): r["dtype"] for r in rows}
    for r in rows:
        if not r.get("tok_s"):
            continue
        if r["engine"] not in (HF_EAGER, HF_FP32):
            where = hf_scenario[r["scenario"]]
            hf, hf32 = speed.get((where, HF_EAGER)), speed.get((where, HF_FP32))
            if hf:
                r["speedup_hf"] = r["tok_s"] / hf
                if hf32:
                    padded = "" if where == r["scenario"] else " padded"
                    r["note"] = (r.get("note") or "") + f"; {r['tok_s'] / hf32:.2f}x HF fp32{padded}"
        for name, subject, other in COMPARISONS:
            theirs = speed.get((r["scenario"], other))
            if r["engine"] == subject and theirs and dtype[(r["scenario"], other)] == r["dtype"]:
                r[name] = r["tok_s"] / theirs
                r["note"] = (r.get("note") or "") + f"; {r[name]:.2f}x {other}"


def _error_note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


# ------------------------------------------------------------------------------ the suite
def _fp32_check(hf, gpt, gpt_generate, device: str, prompt, batches, plan: Plan, notes: list[str],
                log: Callable[[str], None], progress: bool) -> tuple[str | None, torch.Tensor | None]:
    """The fp32 correctness check: (None, HF's batch-1 new tokens) when gptfast matches HF
    (near-ties noted), else (a report of the first mismatch, None)."""
    from tqdm.auto import tqdm

    ref_generate = _hf_generate(hf, device)
    gpt_engine = _gptfast_generate(gpt_generate, gpt, device, BY_NAME[GPTFAST].options)
    parity_batch = batches[0]
    checks = [("batch 1", prompt[None], torch.ones_like(prompt)[None], plan.parity_tokens),
              (f"padded batch of {parity_batch[0].shape[0]}", parity_batch[0], parity_batch[1],
               min(plan.parity_tokens, parity_batch[2]))]
    reference_tokens = None
    with torch.inference_mode():
        for label, ids, mask, new in tqdm(checks, desc="e2e fp32 check", leave=False, disable=not progress):
            expected = ref_generate(ids, mask, new).cpu()
            got = gpt_engine(ids, mask, new).cpu()
            if reference_tokens is None:
                reference_tokens = expected[0, ids.shape[1]:]
            tries = [(label, got)]
            if ids.shape[0] > 1:
                # the same prompts through the Engine API, all at once: the continuous-batching path
                served = serve_continuous(gpt, [(row[m.bool()].tolist(), new) for row, m in zip(ids, mask)],
                                          device)["tokens"]
                engine_out = expected.clone()
                engine_out[:, ids.shape[1]:] = torch.tensor(served, dtype=expected.dtype)
                tries.append((f"{label}, through the Engine API (continuous batching)", engine_out))
            for what, out in tries:
                report = _first_mismatch(expected, out, ids.shape[1])
                if report is not None and expected.shape == out.shape:
                    tie = _near_tie(hf, mask, expected, out, device)
                    if tie is not None:
                        notes.append(f"fp32 check, {what}: identical up to a {tie}")
                        log(f"e2e: fp32 check, {what}: identical up to a {tie}")
                        report = None
                if report is not None:
                    return f"{what}: {report}", None
    log(f"e2e: fp32 greedy tokens identical to HF ({plan.parity_tokens} new tokens; batch 1 and a "
        f"padded batch of {parity_batch[0].shape[0]}, also through the Engine API)")
    return None, reference_tokens




def _free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_e2e(
    device: str,
    dtype: str,
    quick: bool,
    model: str = "gpt2",
    seed: int = 0,
    ceilings: Ceilings | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_rows: Callable[[list[dict], list[str]], None] | None = None,
) -> tuple[list[dict], list[str]]:
    """Run the e2e suite for one (model, dtype); returns (rows, notes). See the module docstring
    for what is measured. Row keys start with the model, so the rows of several runs can share a
    result file.

    Parameters
    ----------
    device : str
        "cuda", "cuda:i" or "cpu".
    dtype : str
        "fp32", "bf16" or "fp16": the dtype timed (correctness is always checked in fp32).
    quick : bool
        Smaller workloads (the GPU check).
    model : str
        A gptfast preset name (random weights) or an HF checkpoint folder.
    seed : int
        Seed of the random weights and prompts.
    ceilings : Ceilings or None
        The measured copy bandwidth (for % BW).
    on_rows : callable or None
        `on_rows(rows, notes)` after every scenario, so a run cut short hands over what it measured.
    """
    if dtype not in DTYPES:
        raise ValueError(f"e2e dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from tqdm.auto import tqdm

    GPT2, gpt_generate = _gptfast_api()
    hf, origin = build_hf_model(model, seed)
    hf = hf.to(device)
    gpt = GPT2.from_pretrained(hf, dtype=torch.float32, device=device)
    config = gpt.config
    plan = make_plan(device, quick, config.n_positions, seed)
    notes = [origin, "EOS disabled on every engine: every run generates exactly the requested tokens",
             "correctness: greedy tokens in fp32 must equal HF's token for token before anything is timed"]
    notes += plan.notes
    for note in notes:
        log(f"e2e: {note}")

    gen = torch.Generator().manual_seed(seed)
    prompt = _prompt(gen, config.vocab_size, plan.prompt_len)
    batches = padded_batches(plan.requests, plan.batch_size, config.vocab_size, config.n_positions, seed)
    requests = served_requests(plan.requests, plan.batch_size, config.vocab_size, config.n_positions, seed)

    # 1. correctness in fp32
    report, reference_tokens = _fp32_check(hf, gpt, gpt_generate, device, prompt, batches, plan, notes,
                                           log, progress)
    if report is not None:
        row = dict(suite="e2e", key=f"{model} | check | gptfast | fp32", model=model, scenario="fp32 check",
                   engine=GPTFAST, dtype="fp32", status="FAIL", note=report, report=report, primary="tok_s",
                   higher_is_better=True)
        return [row], notes

    # 2. timing in the requested dtype
    torch_dtype = DTYPES[dtype]
    hf32 = None
    if torch_dtype != torch.float32:
        del gpt  # with its KV cache: the timed model's cache is sized from the memory left
        _free_device_memory(device)
        gpt = GPT2.from_pretrained(hf, dtype=torch_dtype, device=device)
        if device == "cpu":
            # HF in fp32 too: the CPU target for low precision is stated against HF's fp32.
            import copy

            hf32 = copy.deepcopy(hf)
        hf = hf.to(torch_dtype)
    run = Run(model=model, device=device, dtype=dtype, plan=plan, config=config, hf=hf, hf32=hf32, gpt=gpt,
              generate=gpt_generate, prompt=prompt, batches=batches, requests=requests,
              reference_tokens=reference_tokens, ceilings=ceilings, notes=notes, log=log)
    entrants = {}
    for contender in CONTENDERS:
        generate = contender.build(run, contender)
        if generate is not None:
            entrants[contender.name] = generate
    scenarios = []
    for scenario in SCENARIOS:
        why = scenario.skip(run)
        if why is None:
            scenarios.append((scenario, {n: g for n, g in entrants.items() if scenario.takes(BY_NAME[n])}))
        else:
            notes.append(why)
            log(f"e2e: {why}")

    measured: dict[str, dict] = {}
    bar = tqdm(total=sum(s.runs(plan, len(chosen)) for s, chosen in scenarios), desc="e2e timing", unit="run",
               leave=False, disable=not progress)
    try:
        for scenario, chosen in scenarios:
            def tick(name: str, scenario=scenario) -> None:
                bar.set_postfix_str(f"{scenario.name}: {name}"[:50], refresh=False)
                bar.update()

            try:
                with torch.inference_mode():
                    measured[scenario.name] = scenario.measure(run, chosen, tick)
            except Exception as exc:  # the scenario as a whole failed: an ERROR row per contender
                measured[scenario.name] = {name: exc for name in chosen}
            if on_rows is not None:
                on_rows(build_rows(run, measured), list(notes))
    finally:
        bar.close()
        entrants.clear()
        scenarios.clear()
        if plan.compile_refs:
            torch._dynamo.reset()  # drops the compiled graphs and their CUDA-graph memory pools

    notes.append(f"weights read per decode step: {weight_bytes_per_step(config, torch_dtype) / 1e6:.1f} MB "
                 f"({dtype}, tied head counted once as the head, one wpe row)")
    return build_rows(run, measured), notes

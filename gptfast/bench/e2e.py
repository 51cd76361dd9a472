"""The end-to-end suite: gptfast `generate` against Hugging Face `generate` on the same weights.

1. Weights: a GPT-2 preset built as a `transformers.GPT2LMHeadModel`, randomly initialised from a
   seed (or a checkpoint folder), loaded into gptfast with `GPT2.from_pretrained(hf_model)`. EOS is
   disabled on both so every run generates exactly the requested number of tokens.
2. Correctness first, in fp32: greedy tokens of gptfast must equal HF's, token for token, for the
   batch-1 prompt and the first padded batch of mixed-length prompts. On a mismatch the suite
   reports where and times nothing.
3. Timing in the requested dtype, same prompts, the engines interleaved run by run (a burst of
   load on a shared machine then hits every engine, not just one):
   - batch 1: decode tokens/s (first to last streamed token), tokens/s with prefill, time to
     first token, inter-token latency p50/p99 (a streamer timestamps each `put`), weight
     bandwidth = bytes of weights read per decode step × steps/s, as % of the measured copy
     bandwidth. Bytes per step: every parameter once, the tied head included, except the position
     table (one row is read); for GPT-2 124M in bf16 that is ~247 MB.
   - mixed: a set of requests with mixed prompt and output lengths, served in left-padded batches
     sorted by output length (HF style, the same batches for both engines); useful tokens/s counts
     each request's own output length.
"""

from __future__ import annotations

import os

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .ceilings import Ceilings

COLUMNS = [
    "scenario", "engine", "dtype", "status", "tok_s", "tok_s_prefill", "ttft_ms", "itl_p50_ms",
    "itl_p99_ms", "weight_gbps", "pct_bw", "speedup_hf", "note",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
PAD_ID = 0


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
    compile_hf: bool  # also time HF with a static cache + torch.compile (batch 1)
    notes: list[str] = field(default_factory=list)


def make_plan(device: str, quick: bool, n_positions: int, seed: int = 0) -> Plan:
    """CPU: batch 1 (32-token prompt, 32 new tokens) and 8 prompts of 5..120 tokens × 32 new tokens.
    CUDA: batch 1 (128-token prompt, 256 new; 128 with `quick`) and 256 requests (64 with `quick`)
    of prompt 16..512 and output 16..256 tokens in batches of 64 (32 with `quick`).
    Lengths are clipped to the model's context."""
    gen = torch.Generator().manual_seed(seed)
    if device.startswith("cuda"):
        n = 64 if quick else 256
        prompts = torch.randint(16, 513, (n,), generator=gen).tolist()
        outs = torch.randint(16, 257, (n,), generator=gen).tolist()
        plan = Plan(128, 128 if quick else 256, list(zip(prompts, outs)), 32 if quick else 64,
                    repeats=3 if quick else 5, mixed_repeats=1, parity_tokens=16, compile_hf=not quick)
        if quick:
            plan.notes.append("HF static cache + torch.compile skipped in --quick (compilation takes minutes)")
    else:
        prompts = torch.linspace(5, 120, 8).round().long().tolist()
        plan = Plan(32, 16 if quick else 32, [(p, 32) for p in prompts], 8,
                    repeats=1 if quick else 3, mixed_repeats=1,
                    parity_tokens=8 if quick else 16, compile_hf=False)
        plan.notes.append("HF static cache + torch.compile skipped on the CPU (compile time dominates)")
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
        now = time.perf_counter()
        if not self._prompt_skipped and not self.times and n == self.prompt_len and n > 1:
            self._prompt_skipped = True
            return
        self.times.extend([now] * n)

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


def padded_batches(requests: list[tuple[int, int]], batch_size: int, vocab: int, n_positions: int, seed: int):
    """Requests sorted by output length (longest first) in left-padded batches:
    [(input_ids [b, T], attention_mask [b, T], max_new_tokens, useful tokens)].

    Every row of a batch generates the batch's longest output, so max_new_tokens is cut to what
    fits after the batch's longest prompt (T + max_new_tokens <= n_positions)."""
    gen = torch.Generator().manual_seed(seed + 1)
    prompts = [(_prompt(gen, vocab, p), o) for p, o in requests]
    prompts.sort(key=lambda po: -po[1])
    batches = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        new = min(max(o for _, o in chunk), n_positions - width)
        if new < 1:
            raise ValueError(f"a prompt of {width} tokens leaves no room in a context of {n_positions}")
        batches.append((ids, mask, new, sum(min(o, new) for _, o in chunk)))
    return batches


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


HF_FP32 = "HF fp32 generate (eager, sdpa)"


@dataclass
class Engine:
    name: str
    generate: Callable[..., torch.Tensor]  # (input_ids, attention_mask, max_new_tokens, streamer)


def _engines(hf, gpt_model, gpt_generate, device: str, compile_hf: bool) -> list[Engine]:
    def hf_generate(ids, mask, new, streamer=None, **extra):
        return hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           do_sample=False, pad_token_id=PAD_ID, streamer=streamer, **extra)

    def gpt_gen(ids, mask, new, streamer=None):
        return gpt_generate(gpt_model, input_ids=ids.to(device), attention_mask=mask.to(device),
                            max_new_tokens=new, do_sample=False, pad_token_id=PAD_ID, streamer=streamer)

    engines = [Engine("HF generate (eager, sdpa)", hf_generate)]
    if compile_hf:
        engines.append(Engine("HF static cache + compile",
                              lambda ids, mask, new, streamer=None: hf_generate(
                                  ids, mask, new, streamer, cache_implementation="static")))
    if device != "cpu":
        # gptfast's own eager path (every op through its PyTorch reference): what the kernels
        # gain over eager PyTorch inside the same runtime. On the CPU that is gptfast itself.
        def gpt_reference(ids, mask, new, streamer=None):
            before = os.environ.get("GPTFAST_KERNELS")
            os.environ["GPTFAST_KERNELS"] = "reference"
            try:
                return gpt_gen(ids, mask, new, streamer)
            finally:
                if before is None:
                    del os.environ["GPTFAST_KERNELS"]
                else:
                    os.environ["GPTFAST_KERNELS"] = before

        engines.append(Engine("gptfast eager reference ops", gpt_reference))
    engines.append(Engine("gptfast", gpt_gen))
    return engines


def _each(live: list[Engine], results: dict, fn: Callable[[Engine, dict], None]) -> None:
    """`fn(engine, its result dict)` for each live engine; an engine that raises is recorded and dropped."""
    for engine in list(live):
        try:
            fn(engine, results[engine.name])
        except Exception as exc:
            results[engine.name] = exc
            live.remove(engine)


def _timed(device: str, call: Callable[[], Any]) -> tuple[float, float]:
    """(start, seconds) of `call()`, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    call()
    _sync(device)
    return t0, time.perf_counter() - t0


def _batch1(engines: list[Engine], prompt: torch.Tensor, new: int, repeats: int, device: str) -> dict:
    """Batch 1, engines interleaved run by run (so a burst of load on a shared machine hits all of
    them): a warm-up each, `repeats` rounds of plain runs (tokens/s with prefill: no streamer, no
    per-token host sync), then `repeats` rounds of streamed runs (TTFT, decode tokens/s, ITL).

    Returns {engine name: result dict, or the exception that engine raised}.
    """
    ids, mask = prompt[None], torch.ones_like(prompt)[None]
    results: dict[str, Any] = {e.name: dict(plain=[], runs=[], gaps=[]) for e in engines}
    live = list(engines)
    _each(live, results, lambda e, r: r.update(output=e.generate(ids, mask, new).cpu()))

    def plain(e: Engine, r: dict) -> None:
        r["plain"].append(_timed(device, lambda: e.generate(ids, mask, new))[1])

    def streamed(e: Engine, r: dict) -> None:
        streamer = TimingStreamer(len(prompt))
        t0, _ = _timed(device, lambda: e.generate(ids, mask, new, streamer))
        stamps = streamer.times
        if len(stamps) != new:
            raise RuntimeError(f"{e.name} streamed {len(stamps)} tokens, expected {new}")
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        r["runs"].append(dict(tok_s=decode, ttft_ms=(stamps[0] - t0) * 1e3))
        r["gaps"] += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]

    for _ in range(repeats):
        _each(live, results, plain)
    for _ in range(repeats):
        _each(live, results, streamed)
    for e in live:
        r = results[e.name]
        runs = r.pop("runs")
        out = {k: statistics.median(x[k] for x in runs) if runs[0][k] is not None else None for k in runs[0]}
        gaps = r.pop("gaps")
        out.update(tok_s_prefill=new / statistics.median(r.pop("plain")), itl_p50_ms=_percentile(gaps, 0.5),
                   itl_p99_ms=_percentile(gaps, 0.99), output=r["output"])
        results[e.name] = out
    return results


def _mixed(engines: list[Engine], batches, repeats: int, device: str) -> dict:
    """The mixed set: a warm-up each on the first batch (2 tokens), then `repeats` rounds, each
    engine serving every batch in turn. Returns {engine name: result dict or exception}."""
    results: dict[str, Any] = {e.name: dict(times=[]) for e in engines}
    live = list(engines)
    ids, mask, _, _ = batches[0]
    _each(live, results, lambda e, r: e.generate(ids, mask, 2))

    def serve(e: Engine, r: dict) -> None:
        r["times"].append(_timed(device, lambda: [e.generate(i, m, n) for i, m, n, _ in batches])[1])

    for _ in range(repeats):
        _each(live, results, serve)
    useful = sum(b[3] for b in batches)
    generated = sum(b[0].shape[0] * b[2] for b in batches)
    for e in live:
        t = statistics.median(results[e.name]["times"])
        results[e.name] = dict(tok_s=useful / t, total_s=t, useful_tokens=useful, generated_tokens=generated)
    return results


# ------------------------------------------------------------------------------ the suite
def run_e2e(
    device: str,
    dtype: str,
    quick: bool,
    model: str = "gpt2",
    seed: int = 0,
    ceilings: Ceilings | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[str]]:
    """Run the e2e suite; returns (rows, notes). See the module docstring for what is measured.

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
    notes = [origin, "EOS disabled on both engines: every run generates exactly the requested tokens",
             "correctness: greedy tokens in fp32 must equal HF's token for token before anything is timed"]
    notes += plan.notes
    for note in notes:
        log(f"e2e: {note}")

    gen = torch.Generator().manual_seed(seed)
    prompt = _prompt(gen, config.vocab_size, plan.prompt_len)
    batches = padded_batches(plan.requests, plan.batch_size, config.vocab_size, config.n_positions, seed)
    base = dict(suite="e2e", dtype=dtype, primary="tok_s", higher_is_better=True)

    # 1. correctness in fp32
    ref_engine, gpt_engine = _engines(hf, gpt, gpt_generate, device, compile_hf=False)
    parity_batch = batches[0]
    checks = [("batch 1", prompt[None], torch.ones_like(prompt)[None], plan.parity_tokens),
              (f"padded batch of {parity_batch[0].shape[0]}", parity_batch[0], parity_batch[1],
               min(plan.parity_tokens, parity_batch[2]))]
    reference_tokens = None
    with torch.inference_mode():
        for label, ids, mask, new in tqdm(checks, desc="e2e fp32 check", leave=False, disable=not progress):
            expected = ref_engine.generate(ids, mask, new).cpu()
            got = gpt_engine.generate(ids, mask, new).cpu()
            if reference_tokens is None:
                reference_tokens = expected[0, ids.shape[1]:]
            report = _first_mismatch(expected, got, ids.shape[1])
            if report is not None and expected.shape == got.shape:
                tie = _near_tie(hf, mask, expected, got, device)
                if tie is not None:
                    notes.append(f"fp32 check, {label}: identical up to a {tie}")
                    log(f"e2e: fp32 check, {label}: identical up to a {tie}")
                    report = None
            if report is not None:
                row = dict(base, key="check | gptfast | fp32", scenario="fp32 check", engine="gptfast",
                           dtype="fp32", status="FAIL", note=f"{label}: {report}", report=report)
                return [row], notes
    log(f"e2e: fp32 greedy tokens identical to HF ({plan.parity_tokens} new tokens; batch 1 and a "
        f"padded batch of {parity_batch[0].shape[0]})")

    # 2. timing in the requested dtype
    torch_dtype = DTYPES[dtype]
    hf32 = None
    if torch_dtype != torch.float32:
        gpt = GPT2.from_pretrained(hf, dtype=torch_dtype, device=device)
        if device == "cpu":
            # HF in fp32 too: the CPU target for low precision is stated against HF's fp32.
            import copy

            hf32 = copy.deepcopy(hf)
        hf = hf.to(torch_dtype)
    engines = _engines(hf, gpt, gpt_generate, device, plan.compile_hf)
    if hf32 is not None:
        fp32_engine = _engines(hf32, gpt, gpt_generate, device, False)[0]
        engines.insert(1, Engine(HF_FP32, fp32_engine.generate))
    w_bytes = weight_bytes_per_step(config, torch_dtype)
    rows: list[dict] = []
    hf_speed: dict[str, float] = {}
    hf_tokens = None  # HF's batch-1 output in this dtype, to compare gptfast's with
    bar = tqdm(total=2, desc="e2e timing", leave=False, disable=not progress)
    with torch.inference_mode():
        bar.set_postfix_str("batch 1")
        batch1 = _batch1(engines, prompt, plan.new_tokens, plan.repeats, device)
        bar.update()
        bar.set_postfix_str("mixed")
        # A static cache recompiles per batch shape: HF + compile is timed at batch 1 only.
        mixed = _mixed([e for e in engines if not e.name.startswith("HF static")], batches,
                       plan.mixed_repeats, device)
        bar.update()
    bar.close()

    scenario = f"batch 1, {plan.prompt_len}+{plan.new_tokens} tok"
    for engine in engines:
        row_dtype = "fp32" if engine.name == HF_FP32 else dtype
        row = dict(base, key=f"{scenario} | {engine.name} | {row_dtype}", engine=engine.name,
                   scenario=scenario, dtype=row_dtype,
                   status="PASS" if engine.name == "gptfast" else "ref")
        r = batch1[engine.name]
        if isinstance(r, Exception):
            row.update(status="SKIP" if engine.name.startswith("HF static") else "ERROR",
                       note=f"{type(r).__name__}: {r}".splitlines()[0][:200])
            rows.append(row)
            continue
        tokens = r.pop("output")[0, plan.prompt_len:]
        agree = [f"first {_agreement(reference_tokens, tokens)}/{len(reference_tokens)} tokens = HF fp32"]
        if hf_tokens is None:
            hf_tokens = tokens
        else:
            agree.append(f"{_agreement(hf_tokens, tokens)}/{len(tokens)} = HF {dtype}")
        row.update(r, note="greedy: " + ", ".join(agree))
        if r["tok_s"] is not None:
            row_bytes = weight_bytes_per_step(config, torch.float32) if row_dtype == "fp32" else w_bytes
            row["weight_gbps"] = row_bytes * r["tok_s"] / 1e9
            if ceilings is not None:
                row["pct_bw"] = row["weight_gbps"] / ceilings.copy_gbps * 100
        if engine.name.startswith("HF generate"):
            hf_speed["batch1"] = r["tok_s"]
        elif engine.name == HF_FP32:
            hf_speed["batch1_fp32"] = r["tok_s"]
        elif hf_speed.get("batch1") and r["tok_s"]:
            row["speedup_hf"] = r["tok_s"] / hf_speed["batch1"]
            if hf_speed.get("batch1_fp32"):
                row["note"] += f"; {r['tok_s'] / hf_speed['batch1_fp32']:.2f}x HF fp32"
        rows.append(row)

    scenario = f"mixed: {len(plan.requests)} req, batches of {plan.batch_size}"
    for name, r in mixed.items():
        row_dtype = "fp32" if name == HF_FP32 else dtype
        row = dict(base, key=f"{scenario} | {name} | {row_dtype}", engine=name, scenario=scenario,
                   dtype=row_dtype, status="PASS" if name == "gptfast" else "ref")
        if isinstance(r, Exception):
            row.update(status="ERROR", note=f"{type(r).__name__}: {r}".splitlines()[0][:200])
            rows.append(row)
            continue
        row.update(r, note=f"{r['useful_tokens']} useful of {r['generated_tokens']} generated tokens "
                           f"in {r['total_s']:.2f} s")
        if name.startswith("HF generate"):
            hf_speed["mixed"] = r["tok_s"]
        elif name == HF_FP32:
            hf_speed["mixed_fp32"] = r["tok_s"]
        elif hf_speed.get("mixed"):
            row["speedup_hf"] = r["tok_s"] / hf_speed["mixed"]
            if hf_speed.get("mixed_fp32"):
                row["note"] += f"; {r['tok_s'] / hf_speed['mixed_fp32']:.2f}x HF fp32"
        rows.append(row)
    notes.append(f"weights read per decode step: {w_bytes / 1e6:.1f} MB ({dtype}, tied head counted once "
                 f"as the head, one wpe row)")
    return rows, notes


def _agreement(reference: torch.Tensor, got: torch.Tensor) -> int:
    """How many leading tokens of `got` equal `reference`."""
    n = min(len(reference), len(got))
    same = (reference[:n] == got[:n]).tolist()
    return n if all(same) else same.index(False)

"""Beam search on the paged cache: KV memory of a 5-beam search, and the block manager's host time
per beam step at 256 rows.

    PYTHONPATH=$PWD python3 -m benchmarks.bench_beam [--out benchmarks/results/beam-cpu-<date>.json]

1. Memory. A real 5-beam search (gptfast.beam.beam_search, no EOS so every beam runs the full
   length) on a small random GPT-2 with 16-token blocks; the peak number of blocks the search
   held is measured. The block count does not depend on the model's width, so it is turned into
   bytes for GPT-2 124M in fp16 (2 * 12 layers * 768 * 2 bytes = 36 KiB per token) and compared
   with (a) HF's dense cache, which holds num_beams full rows of prompt + generated tokens and
   re-indexes them every step (a second, transient copy during the reorder), and (b) five
   independent paged sequences of the same length (no sharing).
2. Host time. The block manager's work for one beam step at 256 rows (64 prompts x 4 beams,
   128-token prompts): `reassign_beams` (forks and frees for the step's choice, parents drawn as
   a search draws them: most new beams continue the best beams), `append_tokens` (with the
   copy-on-write pairs) and `block_tables`; median over the steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch

from gptfast import GPT2, GPT2Config, SamplingParams
from gptfast.beam import beam_search, reassign_beams
from gptfast.config import get_config
from gptfast.kv_cache import kv_bytes_per_token


def memory(prompt_len=128, new=64, beams=5, block_size=16) -> dict:
    config = GPT2Config(vocab_size=512, n_positions=prompt_len + new, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = GPT2(config, block_size=block_size)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,)).tolist()
    res = beam_search(model, [prompt], SamplingParams(max_new_tokens=new), num_beams=beams,
                      num_return=1, length_penalty=1.0, early_stopping=False, fill=0)
    per_token = kv_bytes_per_token(get_config("gpt2"), torch.float16)
    tokens = prompt_len + new - 1  # K/V a beam holds at its last step
    independent_blocks = beams * -(-tokens // block_size)
    return {
        "prompt_len": prompt_len, "new_tokens": new, "num_beams": beams, "block_size": block_size,
        "bytes_per_token_gpt2_fp16": per_token,
        "gptfast_peak_blocks": res.peak_blocks,
        "gptfast_peak_MiB": res.peak_blocks * block_size * per_token / 2**20,
        "independent_paged_blocks": independent_blocks,
        "independent_paged_MiB": independent_blocks * block_size * per_token / 2**20,
        "hf_dense_MiB": beams * tokens * per_token / 2**20,
        "hf_dense_during_reorder_MiB": 2 * beams * tokens * per_token / 2**20,
    }


def host_time(prompts=64, beams=4, prompt_len=128, steps=200, warmup=20, block_size=16) -> dict:
    from gptfast import _C

    rows = prompts * beams
    need = rows * -(-(prompt_len + steps + 1) // block_size) + 1
    manager = _C.BlockManager(need, block_size, True)
    rng = np.random.default_rng(0)
    ids = iter(range(10**9))
    live: set[int] = set()
    heads = []
    for _ in range(prompts):
        sid = next(ids)
        manager.allocate_prompt(sid, rng.integers(0, 50257, prompt_len))
        live.add(sid)
        heads.append(sid)
    beam_sids = [[h] * beams for h in heads]
    slots = np.empty(rows, dtype=np.int64)
    cow = np.empty((rows, 2), dtype=np.int64)
    tables = np.empty((rows, -(-(prompt_len + steps + 1) // block_size)), dtype=np.int32)
    # a search's choice: most new beams continue the best running ones
    weights = np.array([0.5, 0.25, 0.15, 0.1][:beams])
    weights /= weights.sum()
    times, cows = [], 0
    for step in range(steps):
        src = ([[0] * beams for _ in range(prompts)] if step == 0 else
               rng.choice(beams, size=(prompts, beams), p=weights).tolist())
        tokens = rng.integers(0, 50257, rows)
        t0 = time.perf_counter()
        beam_sids = reassign_beams(manager, lambda: next(ids), beam_sids, src, live)
        flat = np.fromiter((s for row in beam_sids for s in row), dtype=np.int64, count=rows)
        n_cow = manager.append_tokens(flat, tokens, slots, cow)
        manager.block_tables(flat, tables)
        dt = time.perf_counter() - t0
        assert n_cow >= 0
        if step >= warmup:
            times.append(dt)
            cows += n_cow
    manager.check_invariants()
    return {"rows": rows, "prompts": prompts, "num_beams": beams, "prompt_len": prompt_len,
            "steps_timed": len(times), "median_us_per_step": float(np.median(times) * 1e6),
            "p90_us_per_step": float(np.percentile(times, 90) * 1e6),
            "cow_copies_per_step": cows / len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    with torch.inference_mode():
        mem = memory()
    host = host_time()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "memory": mem, "host": host,
        "provenance": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit,
                       "cpu": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "command": "PYTHONPATH=$PWD python3 -m benchmarks.bench_beam --out "
                                  "benchmarks/results/beam-cpu-<date>.json",
                       "note": "CPU only (no GPU); the manager's host time does not involve the GPU"},
    }
    print(f"5-beam KV, prompt {mem['prompt_len']} + {mem['new_tokens']} new, GPT-2 124M fp16:")
    print(f"  gptfast paged beams : {mem['gptfast_peak_blocks']:4d} blocks  {mem['gptfast_peak_MiB']:7.2f} MiB")
    print(f"  5 independent seqs  : {mem['independent_paged_blocks']:4d} blocks  "
          f"{mem['independent_paged_MiB']:7.2f} MiB")
    print(f"  HF dense cache      :              {mem['hf_dense_MiB']:7.2f} MiB "
          f"({mem['hf_dense_during_reorder_MiB']:.2f} MiB during each reorder)")
    print(f"block manager, one beam step at {host['rows']} rows: median {host['median_us_per_step']:.1f} us, "
          f"p90 {host['p90_us_per_step']:.1f} us, {host['cow_copies_per_step']:.1f} copy-on-write blocks")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

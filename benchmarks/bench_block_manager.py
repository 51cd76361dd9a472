"""Host cost of a decode step in the KV-cache block manager, and paged-KV memory efficiency.

Decode step = what the engine does on the host for every step of the running batch:
`append_tokens` (one token per sequence, slot ids into a preallocated buffer, copy-on-write
pairs) + `block_tables` (every row refreshed into a preallocated int32 [B, max_blocks] buffer).
Timed for the C++ manager (gptfast._C.BlockManager) and its pure-Python model
(tests/block_manager_model.py, same semantics) at batch 1, 64, 256 with ~1024 tokens of context
per sequence, block size 16, prefix caching on. Each round starts B fresh sequences of
`context - steps - (i % block_size)` prompt tokens (untimed; staggered so that block boundaries
are spread over the steps as in a real batch) and times `steps` consecutive decode steps one by one;
the reported figure is the median over all timed steps after warm-up rounds.

Memory: a mixed-length batch (lengths uniform in [1, 1024], fixed seed) is allocated; waste =
allocated slots - used tokens, which paging confines to each sequence's last partial block.
Compared with a contiguous cache that reserves 1024 positions per sequence. Bytes assume GPT-2
124M K+V in fp16: 2 (K, V) x 12 layers x 768 x 2 bytes = 36,864 bytes per token.

Run: python benchmarks/bench_block_manager.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Python model lives with the tests

from gptfast._C import BlockManager  # noqa: E402
from gptfast.bench import provenance, results  # noqa: E402

from block_manager_model import BlockManagerModel  # noqa: E402

KV_BYTES_PER_TOKEN = 2 * 12 * 768 * 2  # GPT-2 124M, fp16 K and V over all layers
MAX_CONTEXT = 1024  # GPT-2 n_positions


def time_decode_steps(make, batch: int, context: int, block_size: int, steps: int, rounds: int,
                      warmup_rounds: int) -> tuple[float, float, float]:
    """Median, p90 and mean µs of one decode step, over `rounds` x `steps` timed steps.

    The mean includes each round's first step, which touches every sequence with cold caches.
    Python's garbage collector is off while timing (as in `timeit`).
    """
    max_blocks = -(-MAX_CONTEXT // block_size)
    prompt_len = context - steps
    rng = np.random.default_rng(0)
    ids = np.arange(batch, dtype=np.int64)
    slots = np.empty(batch, np.int32)
    cow = np.empty((batch, 2), np.int32)
    tables = np.empty((batch, max_blocks), np.int32)
    # Enough blocks for every sequence at full context, plus slack.
    num_blocks = batch * max_blocks + 8
    samples: list[float] = []
    for r in range(warmup_rounds + rounds):
        mgr = make(num_blocks, block_size)
        for sid in range(batch):
            # Distinct random prompts (no prefix hits); lengths staggered so that, as in a real
            # batch, 1 in block_size sequences crosses into a new block at each step.
            n = prompt_len - sid % block_size
            mgr.allocate_prompt(sid, rng.integers(0, 50257, n, dtype=np.int64))
        toks = rng.integers(0, 50257, (steps, batch), dtype=np.int64)
        gc.collect()
        gc.disable()
        for s in range(steps):
            t0 = time.perf_counter_ns()
            k = mgr.append_tokens(ids, toks[s], slots, cow)
            mgr.block_tables(ids, tables)
            dt = time.perf_counter_ns() - t0
            if k != 0:
                raise RuntimeError(f"decode step returned {k}, expected 0 copies")
            if r >= warmup_rounds:
                samples.append(dt / 1e3)
        gc.enable()
        # Correctness spot check: the last row written equals the sequence's table.
        assert tables[batch - 1, : len(mgr.blocks_of(batch - 1))].tolist() == mgr.blocks_of(batch - 1)
    samples.sort()
    return (statistics.median(samples), samples[int(0.9 * (len(samples) - 1))],
            statistics.fmean(samples))


def memory_rows(block_sizes, batch: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_CONTEXT + 1, batch)
    rows = []
    for bs in block_sizes:
        mgr = BlockManager(batch * (-(-MAX_CONTEXT // bs)) + 1, bs, False)
        for sid, n in enumerate(lengths):
            if mgr.allocate_prompt(sid, np.zeros(int(n), np.int64)) < 0:
                raise RuntimeError("memory benchmark pool too small")
        used = int(lengths.sum())
        allocated = (mgr.total_blocks - mgr.num_free_blocks()) * bs
        contiguous = batch * MAX_CONTEXT
        full = BlockManager(-(-MAX_CONTEXT // bs) + 1, bs, False)
        full.allocate_prompt(0, np.zeros(MAX_CONTEXT, np.int64))
        rows.append({
            "block_size": bs,
            "sequences": batch,
            "used_MB": used * KV_BYTES_PER_TOKEN / 1e6,
            "allocated_MB": allocated * KV_BYTES_PER_TOKEN / 1e6,
            "waste_pct": 100.0 * (allocated - used) / allocated,
            "waste_bound_pct": 100.0 * batch * (bs - 1) / allocated,
            "contiguous_MB": contiguous * KV_BYTES_PER_TOKEN / 1e6,
            "contiguous_waste_pct": 100.0 * (contiguous - used) / contiguous,
            "waste_1024_pct": 100.0 * (full.num_blocks - 1 - full.num_free_blocks()) * bs
            / MAX_CONTEXT - 100.0,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="folder for the result files")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024,
                        help="tokens per sequence at the last timed step")
    args = parser.parse_args(argv)

    steps = 16 if args.quick else 48
    cpp_rounds, model_rounds = (3, 1) if args.quick else (20, 3)
    rows = []
    for batch in args.batches:
        cpp_med, cpp_p90, cpp_mean = time_decode_steps(
            BlockManager, batch, args.context, args.block_size, steps, cpp_rounds,
            warmup_rounds=1)
        py_med, py_p90, py_mean = time_decode_steps(
            BlockManagerModel, batch, args.context, args.block_size, steps, model_rounds,
            warmup_rounds=0)
        rows.append({
            "key": f"decode_step/B={batch}",
            "primary": "cpp_us",
            "batch": batch,
            "block_size": args.block_size,
            "context": args.context,
            "cpp_us": cpp_med,
            "cpp_p90_us": cpp_p90,
            "cpp_mean_us": cpp_mean,
            "cpp_ns_per_seq": 1e3 * cpp_med / batch,
            "python_us": py_med,
            "python_p90_us": py_p90,
            "python_mean_us": py_mean,
            "speedup": py_med / cpp_med,
            "target_met": batch != 256 or (cpp_med <= 10.0 and py_med / cpp_med >= 20.0),
        })
    columns = ["batch", "block_size", "context", "cpp_us", "cpp_p90_us", "cpp_mean_us",
               "cpp_ns_per_seq", "python_us", "python_p90_us", "python_mean_us", "speedup",
               "target_met"]
    print("decode step = append_tokens (all sequences) + block_tables refresh; median µs")
    print(results.format_table(rows, columns))

    mem = memory_rows([1, 8, 16, 32, 64], batch=256)
    mem_columns = ["block_size", "sequences", "used_MB", "allocated_MB", "waste_pct",
                   "waste_bound_pct", "contiguous_MB", "contiguous_waste_pct", "waste_1024_pct"]
    print("\nKV memory, 256 sequences of uniform random length 1..1024 (GPT-2 124M fp16 K+V)")
    print(results.format_table(mem, mem_columns))

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    facts = provenance.collect(command, device="cpu")
    notes = [
        "host-only benchmark (no GPU involved): device is the CPU",
        f"decode: {steps} timed steps per round, {cpp_rounds} rounds (C++) / {model_rounds} "
        f"(Python model) after warm-up; sequences of {args.context - steps - args.block_size + 1}"
        f"..{args.context} tokens, staggered; distinct random prompts; prefix caching on",
        "buffers: numpy int64 ids/tokens, int32 slots/cow/block tables, preallocated",
        "target at batch 256: C++ <= 10 µs per step and >= 20x the Python model",
        "load average (1, 5, 15 min) at the end of the run: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs",
    ]
    paths = results.save("block_manager", rows, args.out, columns, provenance=facts, notes=notes)
    mem_rows = [dict(row, key=f"memory/bs={row['block_size']}", primary="waste_pct")
                for row in mem]
    mem_paths = results.save("block_manager_memory", mem_rows, args.out, mem_columns,
                             provenance=facts,
                             notes=["256 sequences, lengths uniform in [1, 1024], seed 0",
                                    f"{KV_BYTES_PER_TOKEN} bytes of K+V per token (GPT-2 124M, "
                                    "fp16)"])
    print(f"\nwrote {paths['json']} and {mem_paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

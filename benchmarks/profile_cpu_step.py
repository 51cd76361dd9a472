"""Where a CPU decode step's time goes: gptfast's int8 matmul kernel, PyTorch ops, Python.

Runs a greedy `generate()` (GPT-2 124M shape, random weights, 32 prompt + N new tokens) once to
warm up, once timed, then once under `cProfile`, which times each builtin call as made (the C++
int8 kernel `gptfast._cpu.linear_int8` and every PyTorch op) and the Python around them. Prints
milliseconds per step by category and the top functions; cProfile's own cost inflates the Python
share. (PyTorch's profiler was tried and dropped: its own cost landed on single ops, e.g. 6 ms per
step on a K/V gather timed at 0.5 ms directly.) Absolute figures move with the machine's load.

    python benchmarks/profile_cpu_step.py --quantize int8 --batch 1
    python benchmarks/profile_cpu_step.py --quantize none --batch 8 --out profile.md
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import time

import torch

import gptfast


def _generate(model, ids, new):
    return gptfast.generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                            do_sample=False, eos_token_id=None, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=64, help="new tokens per row (default 64)")
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = parser.parse_args()
    quantize = None if args.quantize == "none" else args.quantize
    model = gptfast.GPT2.from_config(args.model, seed=0, quantize=quantize).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, 32), generator=torch.Generator().manual_seed(1))
    _generate(model, ids, args.new)  # warm-up: copies, packs, caches

    t0 = time.perf_counter()
    _generate(model, ids, args.new)
    wall = time.perf_counter() - t0

    prof = cProfile.Profile()
    prof.enable()
    _generate(model, ids, args.new)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total_py = sum(v[2] for v in stats.values())
    kernel = sum(v[2] for k, v in stats.items() if "linear_int8" in k[2])
    torch_builtin = sum(v[2] for k, v in stats.items() if k[0] == "~" and "linear_int8" not in k[2])
    python = total_py - kernel - torch_builtin

    per_tok = 1e3 / args.new  # ms per step from seconds per run
    lines = [
        f"## CPU decode step profile: {args.model}, quantize={args.quantize}, batch {args.batch}, "
        f"32 prompt + {args.new} new tokens",
        "",
        f"- {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, gptfast._cpu ISA {gptfast.ops.cpu_linear.supported_isas()[-1]}",
        f"- wall (no profiler): {wall * per_tok:.2f} ms per step ({args.new * args.batch / wall:.1f} tok/s, prefill "
        "included)",
        "",
        "| category (cProfile, ms per step) | ms | share |",
        "|---|---|---|",
        f"| gptfast int8 kernel (`_cpu.linear_int8`) | {kernel * per_tok:.2f} | {kernel / total_py:.0%} |",
        f"| PyTorch ops called from Python (matmuls, SDPA, gathers, LayerNorm, ...) | {torch_builtin * per_tok:.2f} "
        f"| {torch_builtin / total_py:.0%} |",
        f"| Python (engine, model, op wrappers and checks) | {python * per_tok:.2f} | {python / total_py:.0%} |",
        "",
        "Top 8 functions by own time (cProfile: builtins are PyTorch ops and the int8 kernel, timed as called):",
        "",
        "| function | calls per step | ms per step |",
        "|---|---|---|",
    ]
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    for (file, line, name), (_, calls, tottime, _, _) in top:
        where = name if file == "~" else f"{file.rsplit('/', 1)[-1]}:{line} {name}"
        lines.append(f"| `{where}` | {calls / args.new:.1f} | {tottime * per_tok:.3f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()

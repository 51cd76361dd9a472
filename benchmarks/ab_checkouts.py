"""A/B of `gptfast.generate` speed between two checkouts, runs interleaved on the same machine.

On a shared or noisy machine two separate benchmark runs minutes apart differ by more than a
small change does; this alternates fresh processes of the two checkouts (old, new, old, new, ...)
on the same workload and reports each side's median. Greedy, EOS off, random GPT-2 weights.

    git worktree add /tmp/old <commit>          # the baseline checkout (copy its gptfast/_C*.so
    cp gptfast/_C*.so /tmp/old/gptfast/         # when csrc/ did not change, or build it)
    python benchmarks/ab_checkouts.py /tmp/old . --dtype bf16 --batch 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_RUN = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import gptfast
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[2]]
batch, new, device, model_name = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
model = gptfast.GPT2.from_config(model_name, seed=0, dtype=dtype, device=device)
g = torch.Generator().manual_seed(0)
vocab = model.config.vocab_size
if batch == 1:
    ids = torch.randint(0, vocab, (1, 32), generator=g)
    mask = torch.ones_like(ids)
else:  # left-padded prompts of mixed lengths
    ids = torch.randint(1, vocab, (batch, 120), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, :(b * 13) % 100] = 0
    ids[mask == 0] = 0
kw = dict(attention_mask=mask.to(device), pad_token_id=0, eos_token_id=None)
gptfast.generate(model, ids.to(device), max_new_tokens=4, **kw)  # warm-up
if device.startswith("cuda"):
    torch.cuda.synchronize()
t = time.perf_counter()
gptfast.generate(model, ids.to(device), max_new_tokens=new, **kw)
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps(batch * new / (time.perf_counter() - t)))
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the baseline checkout (its root folder)")
    p.add_argument("new", help="the candidate checkout")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="gpt2", help="a preset name (random weights)")
    args = p.parse_args(argv)
    speeds: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for side in ("old", "new"):
            cmd = [sys.executable, "-c", _RUN, getattr(args, side), args.dtype, str(args.batch),
                   str(args.new_tokens), args.device, args.model]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{side} ({getattr(args, side)}) failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            speeds[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.model} {args.dtype} batch {args.batch}, {args.new_tokens} new tokens, {args.device}, "
          f"{args.repeats} interleaved runs each (tokens/s incl. prefill):")
    for side in ("old", "new"):
        print(f"  {side}: median {statistics.median(speeds[side]):.2f}  runs {[round(x, 1) for x in speeds[side]]}")
    ratio = statistics.median(speeds["new"]) / statistics.median(speeds["old"])
    print(f"  new / old: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

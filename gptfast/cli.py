"""`gptfast` command line: `gptfast generate` (text from a checkpoint or preset) and
`gptfast bench` (the benchmark suite). Also `python -m gptfast`."""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = ("float32", "bfloat16", "float16")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="gpt2",
                   help="an HF checkpoint folder, a nanoGPT ckpt.pt, or a preset name "
                        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny: random weights); default gpt2")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (needs a tokenizer in the checkpoint folder)")
    src.add_argument("--ids", help="comma-separated token ids to continue, e.g. 464,2068,7586")
    src.add_argument("--interactive", action="store_true",
                     help="read prompts from the terminal in a loop (empty line or EOF ends)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=40,
                   help="keep the k most likely tokens (default 40, as GPT-2's sampler; 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams (default 1 = off; implies --greedy)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


class _PrintStreamer:
    """HF streamer protocol: the prompt first, then one tensor of new tokens per step."""

    def __init__(self, tokenizer, out=None):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.out = out if out is not None else sys.stdout
        self.seen_prompt = False
        self.count = 0

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for token in value.view(-1).tolist():
            self.count += 1
            text = self.decoder.push(token) if self.decoder is not None else f" {token}"
            self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.decoder is not None:
            self.out.write(self.decoder.flush())
        self.out.write("\n")
        self.out.flush()


def _load(args):
    import torch

    from .model import is_preset, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    print(f"loading {args.model} ({args.dtype}, {device}) ...", file=sys.stderr, flush=True)
    model = load_model(args.model, dtype=dtype, device=device, progress=True)
    if is_preset(args.model):
        print(f"NOTE: preset {args.model!r} has randomly initialised weights: the text is noise",
              file=sys.stderr)
    tokenizer = None
    folder = getattr(model, "tokenizer_dir", None)
    if folder is not None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder)
    print(f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model, tokenizer


def _run_generate(args) -> int:
    import torch

    from .generation import generate
    from .model import is_preset

    if args.prompt is not None and is_preset(args.model):
        print("error: --prompt needs a checkpoint folder with a tokenizer; a preset has none "
              "(use --ids)", file=sys.stderr)
        return 2
    model, tokenizer = _load(args)
    if args.prompt is not None and tokenizer is None:
        print(f"error: {args.model} has no tokenizer files (tokenizer.json or vocab.json + "
              "merges.txt); use --ids", file=sys.stderr)
        return 2

    def one(prompt_ids):
        input_ids = None if prompt_ids is None else torch.tensor([prompt_ids], dtype=torch.long)
        pad = model.generation_defaults.get("pad_token_id")
        if pad is None:
            eos = model.generation_defaults.get("eos_token_id")
            pad = (eos[0] if isinstance(eos, list) and eos else eos) if eos is not None else 0
        kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad)
        if args.greedy:
            kw["do_sample"] = False
        else:
            kw.update(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p)
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"{'=' * 20} sample {i + 1} {'=' * 20}")
            streamer = _PrintStreamer(tokenizer)
            t0 = time.perf_counter()
            if args.seed is not None and not args.greedy:
                kw["seed"] = args.seed + i
            if args.num_beams > 1:
                # beam search settles its tokens at the end: no streaming
                kw.update(do_sample=False, num_beams=args.num_beams)
                kw = {k: v for k, v in kw.items() if k not in ("temperature", "top_k", "top_p", "seed")}
                out = generate(model, input_ids, **kw)
                n = 1 if input_ids is None else input_ids.shape[1]
                streamer.put(out[:, :n])
                streamer.put(out[0, n:])
                streamer.end()
            else:
                generate(model, input_ids, streamer=streamer, **kw)
            dt = time.perf_counter() - t0
            print(f"[{streamer.count} tokens in {dt:.2f}s: {streamer.count / dt:.1f} tokens/s]",
                  file=sys.stderr)

    def encode(text):
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids

    try:
        if args.interactive:
            while True:
                try:
                    text = input("Model prompt >>> " if tokenizer is not None else "Token ids >>> ")
                except EOFError:
                    break
                if not text.strip():
                    break
                ids = encode(text) if tokenizer is not None else _parse_ids(text)
                one(ids)
        else:
            ids = None
            if args.prompt is not None:
                ids = encode(args.prompt)
            elif args.ids is not None:
                ids = _parse_ids(args.ids)
            one(ids)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"token ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise ValueError("no token ids given")
    return ids


def main(argv: list[str] | None = None) -> int:
    from .bench import add_bench_arguments, run_bench

    parser = argparse.ArgumentParser(prog="gptfast", description="Fast GPT-2 generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a checkpoint or preset",
                         description="Generate text, streamed as it comes, with tokens/s at the end.")
    _generate_arguments(gen)
    bench = sub.add_parser("bench", help="benchmark gptfast against eager PyTorch and HF",
                           description="Correctness first, then speed in roofline units.")
    add_bench_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _run_generate(args)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())

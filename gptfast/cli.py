"""`gptfast` command line: `gptfast generate` (text from a checkpoint, a Hugging Face model name
or, with --random-weights, a preset), `gptfast bench` (the benchmark suite) and `gptfast kernels`
(every GPU kernel compiled and counted without a GPU). Also `python -m gptfast`.

Errors in the arguments are one line, `error: ...`, exit status 2, reported before any model is
loaded. Ctrl-C during a sample stops that sample (back to the prompt with --interactive); Ctrl-C
at the prompt exits with status 130, Ctrl-D or an empty line with 0.

Each subcommand is a function that adds its subparser (`_add_<name>`, listed in `SUBCOMMANDS`)
and a function that runs it (set as the subparser's `run` default). The command sits on top of
every other module, the bench included; what the subcommands share is in `cli_common`.
"""

from __future__ import annotations

import difflib
import sys
import time
from pathlib import Path

from .cli_common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    SHORT_DTYPE,
    OneLineErrorParser,
    UsageError,
    dtype_name,
    resolve_device,
)

# --------------------------------------------------------------------------------------- generate


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint or a Hugging Face model name",
                       description="Generate text, streamed as it comes, with tokens/s at the end. "
                                   "Ctrl-C stops the current sample.")
    p.add_argument("model", nargs="?", default="gpt2",
                   help="an HF checkpoint folder, a nanoGPT ckpt.pt, or a Hugging Face model name resolved "
                        "through the local HF cache (downloaded where the hub is reachable); default gpt2. "
                        "With --random-weights: a preset name")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights in the shape of the preset MODEL (gpt2, gpt2-medium, gpt2-large, "
                        "gpt2-xl, tiny, tiny-odd): the speed is real, the text is noise")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (needs the checkpoint's tokenizer)")
    src.add_argument("--ids", help="comma-separated token ids to continue, e.g. 464,2068,7586")
    src.add_argument("--interactive", action="store_true",
                     help="read prompts from the terminal in a loop (Ctrl-D or an empty line ends)")
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
    p.add_argument("--dtype", type=dtype_name, default="float32", metavar="DTYPE",
                   help="weights and activations: fp32/float32 (default), bf16/bfloat16, fp16/float16")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.set_defaults(run=_run_generate)


class _PrintStreamer:
    """HF streamer protocol: the prompt first (echoed), then one tensor of new tokens per step.

    The end-of-text token ends the sample and is not printed; ids the tokenizer does not have
    print as `<id>`.
    """

    def __init__(self, tokenizer, echo: str, eos_ids: set[int], out=None):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.echo = echo
        self.eos_ids = eos_ids
        self.out = out if out is not None else sys.stdout
        self.seen_prompt = False
        self.ended = False
        self.count = 0

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            self.out.write(self.echo)
            self.out.flush()
            return
        for token in value.view(-1).tolist():
            self.count += 1
            if self.ended or token in self.eos_ids:
                self.ended = True  # generate() stops here; nothing after EOS is text
                continue
            if self.decoder is None:
                text = f" {token}"
            elif token >= self.tokenizer.vocab_size:
                text = self.decoder.flush() + f"<{token}>"
            else:
                text = self.decoder.push(token)
            self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.decoder is not None:
            self.out.write(self.decoder.flush())
        self.out.write("\n")
        self.out.flush()


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"token ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise UsageError("no token ids given")
    return ids


def _check_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return ids


def _presets() -> str:
    from .config import PRESETS

    return ", ".join(PRESETS)


def _check_generate(args) -> None:
    """Everything the arguments alone can get wrong, before anything is loaded."""
    from .config import PRESETS

    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1 (1 = off), got {args.num_beams}")
    if args.num_beams > 1 and args.num_samples > 1:
        raise UsageError("--num-samples > 1 with --num-beams would repeat the same (deterministic) beam search")
    if not args.greedy and args.num_beams == 1:  # a beam search ignores the sampling options
        if not args.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {args.temperature} (for greedy decoding: --greedy)")
        if args.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
        if not 0 < args.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.ids is not None:
        args.prompt_ids = _parse_ids(args.ids)
    if args.random_weights:
        if args.model not in PRESETS:
            close = difflib.get_close_matches(args.model, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--random-weights needs a preset name, got {args.model!r}{hint} "
                             f"(presets: {_presets()})")
        if args.prompt is not None:
            raise UsageError("--prompt needs a tokenizer and --random-weights loads none: give token ids "
                             "with --ids")
        if args.ids is not None:
            _check_ids(args.prompt_ids, PRESETS[args.model].vocab_size)
    else:
        from . import hub

        path = Path(args.model).expanduser()
        if not path.exists() and not hub.is_hub_id(args.model):
            raise UsageError(f"no such file or folder: {args.model!r} (and it is not a Hugging Face model name)")
        if path.exists():
            args.model = str(path)
    args.device = resolve_device(args.device)


def _source_folder(args) -> str:
    """The local checkpoint for `args.model`: the path itself, or the Hugging Face cache's snapshot."""
    from . import hub
    from .config import PRESETS

    if not hub.is_hub_id(args.model):
        return args.model
    print(f"looking up {args.model} in the Hugging Face cache ({hub.cache_dir()}) ...", file=sys.stderr, flush=True)
    try:
        return str(hub.snapshot(args.model))
    except FileNotFoundError as exc:
        close = difflib.get_close_matches(args.model, PRESETS, n=1)
        preset = close[0] if close else "gpt2"
        raise UsageError(f"{exc}; for random weights in a preset's shape: gptfast generate {preset} "
                         f"--random-weights (presets: {_presets()})") from None


def _load(args):
    """(model, tokenizer or None), saying on stderr what was loaded."""
    import torch

    from .model import GPT2

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    tokenizer = None
    if args.random_weights:
        print(f"building {args.model} with random weights ({SHORT_DTYPE[args.dtype]}, {args.device}) ...",
              file=sys.stderr, flush=True)
        model = GPT2.from_config(args.model, seed=0, dtype=dtype, device=args.device,
                                  progress=sys.stderr.isatty())
        print(f"NOTE: random weights (preset {args.model!r}, GPT-2 init, seed 0): the speed is real, the text "
              "is noise", file=sys.stderr)
    else:
        from .tokenizer import has_tokenizer_files, load_tokenizer

        folder = _source_folder(args)
        where = Path(folder) if Path(folder).is_dir() else Path(folder).parent
        if args.prompt is not None and not has_tokenizer_files(where):
            raise UsageError(f"--prompt needs tokenizer files (tokenizer.json, or vocab.json + merges.txt) "
                             f"beside the weights, and {where} has none: give token ids with --ids")
        print(f"loading {folder} ({SHORT_DTYPE[args.dtype]}, {args.device}) ...", file=sys.stderr, flush=True)
        try:
            model = GPT2.from_pretrained(folder, dtype=dtype, device=args.device, progress=sys.stderr.isatty())
        except (FileNotFoundError, ValueError, TypeError) as exc:
            raise UsageError(" ".join(str(exc).split())) from None
        if model.tokenizer_dir is not None:
            tokenizer = load_tokenizer(model.tokenizer_dir)
            if tokenizer.vocab_size < model.config.vocab_size:
                print(f"warning: the tokenizer has {tokenizer.vocab_size} ids, fewer than the model's vocabulary "
                      f"({model.config.vocab_size}); sampled ids it lacks print as <id>", file=sys.stderr)
    print(f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model, tokenizer


def _eos_ids(model) -> set[int]:
    eos = model.generation_defaults.get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _run_generate(args) -> int:
    _check_generate(args)
    model, tokenizer = _load(args)

    import torch

    from .generation import generate

    eos_ids = _eos_ids(model)
    pad = model.generation_defaults.get("pad_token_id")
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad)
    if args.greedy:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    def samples(prompt_ids: list[int] | None, echo: str) -> bool:
        """Every sample for one prompt; False when Ctrl-C stopped one."""
        input_ids = None if prompt_ids is None else torch.tensor([prompt_ids], dtype=torch.long)
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"{'=' * 20} SAMPLE {i + 1} {'=' * 20}", flush=True)
            streamer = _PrintStreamer(tokenizer, echo, eos_ids)
            if args.seed is not None and not args.greedy:
                kw["seed"] = args.seed + i
            t0 = time.perf_counter()
            try:
                if args.num_beams > 1:
                    # beam search settles its tokens only at the end (HF refuses a streamer too):
                    # the best hypothesis is printed whole
                    beam_kw = {k: v for k, v in kw.items() if k not in ("temperature", "top_k", "top_p", "seed")}
                    out = generate(model, input_ids, do_sample=False, num_beams=args.num_beams,
                                   **{k: v for k, v in beam_kw.items() if k != "do_sample"})
                    prompt_len = 1 if input_ids is None else input_ids.shape[1]
                    streamer.put(out[:1, :prompt_len])
                    streamer.put(out[0, prompt_len:])
                    streamer.end()
                else:
                    generate(model, input_ids, streamer=streamer, **kw)
            except ValueError as exc:  # what only the model can tell: e.g. prompt + new tokens too long
                raise UsageError(" ".join(str(exc).split())) from None
            except KeyboardInterrupt:
                # generate() has released the sample's KV blocks and ended the line on its way out
                print(f"[interrupted after {streamer.count} tokens]", file=sys.stderr, flush=True)
                return False
            dt = time.perf_counter() - t0
            stop = "; stopped at end of text" if streamer.ended else ""
            print(f"[{streamer.count} tokens in {dt:.2f}s: {streamer.count / dt:.1f} tokens/s{stop}]",
                  file=sys.stderr, flush=True)
        return True

    def prompt_from(text: str) -> tuple[list[int], str]:
        if tokenizer is None:
            ids = _parse_ids(text)
            return _check_ids(ids, model.config.vocab_size), " ".join(map(str, ids))
        ids = tokenizer.encode(text)
        if not ids:
            raise UsageError(f"the prompt {text!r} encodes to no tokens")
        return _check_ids(ids, model.config.vocab_size), text

    if not args.interactive:
        if args.prompt is not None:
            ids, echo = prompt_from(args.prompt)
        elif args.ids is not None:
            ids = _check_ids(args.prompt_ids, model.config.vocab_size)
            echo = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        else:
            ids, echo = None, ""
        return 0 if samples(ids, echo) else EXIT_INTERRUPTED

    label = "Model prompt >>> " if tokenizer is not None else "Token ids >>> "
    while True:
        try:
            text = input(label)
        except EOFError:
            print(flush=True)  # the shell prompt starts on its own line
            return 0
        except KeyboardInterrupt:
            print(flush=True)
            return EXIT_INTERRUPTED
        if not text.strip():
            return 0
        try:
            ids, echo = prompt_from(text)
            samples(ids, echo)
        except UsageError as exc:  # a bad prompt is reported; the loop goes on
            print(f"error: {exc}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ bench


def _add_bench(sub) -> None:
    from .bench import add_bench_arguments, run_bench

    p = sub.add_parser("bench", help="benchmark gptfast against eager PyTorch and HF",
                       description="Correctness first, then speed in roofline units.")
    add_bench_arguments(p)
    p.set_defaults(run=run_bench)


# ------------------------------------------------------------------------------------------- main

def _add_kernels(sub) -> None:
    from .bench.kernels import add_kernels_arguments, run_kernels

    p = sub.add_parser("kernels", help="compile and count every GPU kernel, no GPU needed",
                       description="Compile every Triton kernel variant of the decode step and the "
                                   "prefill for a GPU target (registers, spills, shared memory, "
                                   "occupancy) and count each decode step's kernels and bytes, on "
                                   "any machine.")
    add_kernels_arguments(p)
    p.set_defaults(run=run_kernels)


SUBCOMMANDS = (_add_generate, _add_bench, _add_kernels)


def main(argv: list[str] | None = None) -> int:
    """Run `gptfast ARGS` (default: sys.argv[1:]); returns the exit status."""
    parser = OneLineErrorParser(prog="gptfast", description="Fast GPT-2 generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

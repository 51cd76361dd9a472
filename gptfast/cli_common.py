"""What the `gptfast` subcommands share: dtype spellings, the device check, one-line errors.

`gptfast generate` (gptfast/cli.py), `gptfast bench` and `gptfast kernels` (gptfast/bench/) use
these; the command itself (gptfast/cli.py) sits on top of the bench, so they live here, below both.
"""

from __future__ import annotations

import argparse
import sys

# Every dtype spelling the command line accepts -> torch's attribute name.
DTYPE_ALIASES = {
    "fp32": "float32", "float32": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16",
}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class UsageError(Exception):
    """A problem with the command line, reported as one `error: ...` line with exit status 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit 2) instead of usage + message."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def dtype_name(text: str) -> str:
    """torch's name for a dtype given as fp32/bf16/fp16 or float32/bfloat16/float16.

    Examples
    --------
    >>> dtype_name("bf16"), dtype_name("float16")
    ('bfloat16', 'float16')
    """
    name = DTYPE_ALIASES.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; allowed: {', '.join(DTYPE_ALIASES)}")
    return name


def resolve_device(device: str | None) -> str:
    """`device` checked against what torch sees here ("cpu", "cuda", "cuda:N"); None: the GPU if
    there is one. Raises `UsageError` naming what is available."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}"
                         f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0.."
                         f"cuda:{torch.cuda.device_count() - 1})")
    return device

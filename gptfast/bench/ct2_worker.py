"""The CTranslate2 contenders' process: CTranslate2 converts, loads and generates here, never in
the benchmark's own process.

Why a process of its own: CTranslate2 ships its own OpenMP runtime (a second libgomp beside
torch's). After one CTranslate2 call in a process, torch's two-thread regions there start ~100 us
later for the rest of the process (measured on the 2-core development machine: a 3072x768 int8
GEMV went from 54 to ~150 us, MKL's 3072x768 fp32 GEMV from ~175 to ~280 us, and gptfast int8's
batch-1 decode from ~84 to ~50 tokens/s), so every PyTorch contender timed after it would be
slowed by the comparison itself. In a process of its own CTranslate2 runs as it would for a user,
and so do gptfast and HF. The benchmark's process waits on a pipe while CTranslate2 runs (no CPU
used), and the step timestamps come back from here (`time.perf_counter` is the system-wide
monotonic clock).

The worker is a plain subprocess, `python -m gptfast.bench.ct2_worker READ_FD WRITE_FD`, that
talks over two pipes with `multiprocessing.connection.Connection` messages: nothing of the
benchmark's script is imported again there (as `multiprocessing`'s "spawn" would import an
unguarded `__main__`). It ignores Ctrl-C (the benchmark's process stops it) and exits when its
pipe closes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def serve(requests, replies) -> None:
    """The worker's loop. The first request is (src, workdir, models, threads): convert the HF
    folder `src` with CTranslate2's own converter to each
    (contender name, compute type) of `models` under `workdir`, load a generator for each with
    `threads` intra-op threads, reply ("ready", ctranslate2 version) (or ("error", message) and
    exit), then answer requests until None or a closed pipe.

    A request is (name, rows, new, stream): prompts as lists of token ids (no padding), greedy,
    exactly `new` tokens each. The reply is ("ok", new token ids per row, step timestamps) with a
    `time.perf_counter()` stamp per generated step when `stream` (batch 1), else none; or
    ("error", message).
    """
    conn = replies
    try:
        src, workdir, models, threads = requests.recv()
        import ctranslate2

        generators, vocabularies = {}, {}
        for name, compute_type in models:
            out = Path(workdir, compute_type)
            ctranslate2.converters.TransformersConverter(src).convert(str(out), quantization=compute_type, force=True)
            generators[name] = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                                     intra_threads=threads, inter_threads=1)
            vocabularies[name] = json.loads(Path(out, "vocabulary.json").read_text())  # token i's name
    except Exception as exc:  # reported to the benchmark, which skips the contenders with the reason
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", ctranslate2.__version__))
    while True:
        try:
            request = requests.recv()
        except EOFError:  # the benchmark's process is gone
            return
        if request is None:
            return
        name, rows, new, stream = request
        try:
            names = vocabularies[name]
            stamps: list[float] = []

            def callback(step):
                stamps.append(time.perf_counter())
                return False  # keep going

            # CTranslate2 takes prompts as token names (ids come back as ids)
            results = generators[name].generate_batch(
                [[names[t] for t in row] for row in rows], max_length=new, min_length=new, sampling_topk=1,
                include_prompt_in_result=False, callback=callback if stream else None)
            conn.send(("ok", [r.sequences_ids[0] for r in results], stamps))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def main(argv: list[str]) -> None:
    import signal
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark's process decides when this one ends
    serve(Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

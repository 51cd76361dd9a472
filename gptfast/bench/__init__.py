"""`gptfast bench`: correctness-checked benchmarks of gptfast's ops and of generation end to end.

Suites:

- e2e (default, the main job): gptfast against Hugging Face `generate` (eager; static cache +
  torch.compile) and a torch.compile'd eager reference, on the same randomly initialised GPT-2
  weights: fp32 greedy tokens must match first; then tokens/s at batch 1 and for a set of
  mixed-length requests (padded batches; continuous batching), time to first token, inter-token
  latency, weight bandwidth, kernels per decode step. `--model` and `--dtype` take
  comma-separated lists: one run per (model, dtype), all rows in one result file.
- ops: every op with cases in `gptfast.bench.op_cases` (`benchmark_cases`): fast path checked against its
  eager reference, then timed in µs, GB/s, TFLOP/s, % of the measured floor, speedups.

Results go to `--out` (default: `default_out_dir()`, outside any checkout); the last line printed
is `results: <folder>`. Only argparse is imported here, so `gptfast bench --help` is instant;
torch, triton, matplotlib and transformers load when a suite runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from pathlib import Path

__all__ = ["add_bench_arguments", "run_bench", "default_out_dir"]

_DTYPES = ("fp32", "bf16", "fp16")


def default_out_dir() -> Path:
    """Where a run without --out writes: the user's data folder, `$XDG_DATA_HOME/gptfast/bench`
    (`~/.local/share/gptfast/bench` by default), so a casual run never writes into a checkout.
    The project's committed results are written with `--out benchmarks/results`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gptfast" / "bench"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark options to `parser` (used by `gptfast bench` and `python -m benchmarks`)."""
    parser.add_argument("--suite", choices=("e2e", "ops", "all"), default="e2e",
                        help="e2e: gptfast vs HF generate on the same random GPT-2 (default); "
                             "ops: each kernel vs its eager reference; all: ops then e2e")
    parser.add_argument("--quick", action="store_true",
                        help="small workloads (what benchmarks/gpu_check.sh runs)")
    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--dtype", "--dtypes", type=_dtype_list, default=None, metavar="DTYPE[,DTYPE...]",
                        help="e2e model dtype(s), comma-separated from fp32,bf16,fp16 (or float32, bfloat16, "
                             "float16; default: bf16 on CUDA, fp32 on the CPU); correctness is always "
                             "checked in fp32 first")
    parser.add_argument("--model", "--models", type=_model_list, default=["gpt2"], metavar="MODEL[,MODEL...]",
                        help="gptfast preset(s) (random weights: gpt2, gpt2-medium, gpt2-xl, ..., tiny) or "
                             "HF checkpoint folders, comma-separated (default: gpt2, the 124M shape); "
                             "e2e runs every model in every dtype")
    parser.add_argument("--ops", nargs="+", metavar="NAME",
                        help="ops suite: only these ops (op or module names, e.g. decode_attention sampling)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for result files (default: ~/.local/share/gptfast/bench, or "
                             "$XDG_DATA_HOME/gptfast/bench)")
    parser.add_argument("--formats", default="json,csv,md",
                        help="result files to write, comma-separated from json,csv,md (default: all)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD.json", "NEW.json"),
                        help="compare two result files (speed ratio per row, regressions flagged; "
                             "exit status 1 if any) instead of running")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="--compare: a row slower by more than this fraction is a regression "
                             "(default 0.05)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _dtype_list(text: str) -> list[str]:
    """Comma-separated dtypes in either spelling (bf16 or bfloat16, ...) -> short names."""
    from ..cli_common import DTYPE_ALIASES, SHORT_DTYPE

    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in DTYPE_ALIASES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"dtypes must be comma-separated from {','.join(_DTYPES)} (or "
                                         f"float32, bfloat16, float16); got {text!r}")
    return list(dict.fromkeys(SHORT_DTYPE[DTYPE_ALIASES[v]] for v in values))


def _model_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"--model needs at least one preset or folder, got {text!r}")
    return list(dict.fromkeys(values))


def run_bench(args: argparse.Namespace) -> int:
    """Run what `args` asks for; print the tables, then `results: <folder>` last.

    Returns 0 when every check passed, 1 when a correctness check failed or a case errored (or,
    with --compare, when a regression was flagged), 2 for bad arguments (one `error: ...` line).
    """
    from ..cli_common import UsageError

    try:
        return _run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..cli_common import UsageError, resolve_device

    if args.compare:
        from .results import compare_files

        try:
            text, regressions = compare_files(args.compare[0], args.compare[1], args.threshold)
        except ValueError as exc:
            raise UsageError(f"--compare: {exc}") from None
        print(text)
        return 1 if regressions else 0

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - {"json", "csv", "md"}:
        raise UsageError(f"--formats must list some of json,csv,md; got {args.formats!r}")
    device = resolve_device(args.device)
    too_late = _choose_triton_interpreter(device, args.suite)
    # lists from the command line; a single string from callers that build the namespace themselves
    dtypes = args.dtype or ["bf16" if device.startswith("cuda") else "fp32"]
    dtypes = [dtypes] if isinstance(dtypes, str) else dtypes
    models = [args.model] if isinstance(args.model, str) else args.model
    out_dir = Path(args.out if args.out is not None else default_out_dir()).expanduser()
    progress = not args.no_progress

    from gptfast.ops import _triton

    from . import provenance, results

    facts = provenance.collect(device=device)
    print(f"gptfast bench: suite {args.suite} on {facts['device']} ({device}), torch {facts['torch']}, "
          f"triton {facts['triton']}, transformers {facts['transformers']}", flush=True)
    machine = provenance.machine_note(facts)
    print(machine, flush=True)
    skipped = [] if too_late is None else [too_late]
    if too_late is not None:
        print(f"gptfast bench: {too_late}", flush=True)
    if not _triton.AVAILABLE:
        skipped.append(f"{_triton.MISSING_REASON}: the Triton kernels were skipped (not checked, not timed); "
                       "only the eager references ran")
        print(f"gptfast bench: {skipped[-1]}", flush=True)
    if args.suite in ("ops", "all") and args.ops:
        _check_ops_names(args.ops, device, args.quick)  # before any file is written
    # A file per suite from the start, rewritten as rows come: a run cut short leaves its rows.
    partials = {name: results.PartialResults(name, out_dir, None, provenance=facts)
                for name in (("ops", "e2e") if args.suite == "all" else (args.suite,))}
    try:
        with _sigterm_as_interrupt():
            return _run_suites(args, device, facts, partials, dtypes, models, out_dir, formats, progress,
                               machine, skipped)
    except KeyboardInterrupt:
        for partial in partials.values():
            if not partial.finished:
                path = partial.interrupted("SIGINT/SIGTERM")
                print(f"gptfast bench: interrupted; the rows measured so far are in {path}", file=sys.stderr,
                      flush=True)
        return 130


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM and SIGINT end the run with KeyboardInterrupt (SIGINT even when the process was
    started with it ignored, as a non-interactive shell does for background jobs), so the partial
    files get their last note; only in the main thread (signal handlers can only be set there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_suites(args, device, facts, partials, dtypes, models, out_dir, formats, progress,
                machine: str, skipped: list[str]) -> int:
    from ..cli_common import UsageError
    from . import ceilings as ceilings_mod
    from . import results
    from .summary import SCREEN, SCREEN_LEGEND, flag_noisy, screen_table

    ceil = ceilings_mod.measure(device, quick=args.quick)
    ceiling_note = (f"measured ceilings: copy {ceil.copy_gbps:,.1f} GB/s (read + write, "
                    f"{ceil.copy_bytes >> 20} MiB), {ceil.matmul_dtype} matmul {ceil.matmul_tflops:,.2f} "
                    f"TFLOP/s ({ceil.matmul_n}³)")
    print(ceiling_note, flush=True)
    facts = dict(facts, ceilings=ceil.as_dict())
    for partial in partials.values():
        partial.provenance = facts
        partial.update([], [ceiling_note])

    tables: list[str] = []
    failed = False
    written: list[Path] = []
    noisy = 0
    if args.suite in ("ops", "all"):
        from . import runner

        rows = runner.run_ops(device, args.quick, ops=args.ops, ceilings=ceil, progress=progress,
                              on_rows=partials["ops"].update)
        if not rows:
            known = sorted({c.op for _, m in runner.discover() if not isinstance(m, BaseException)
                            for c in m.benchmark_cases(device, args.quick)})
            raise UsageError(f"no ops case matched --ops {' '.join(args.ops or [])}; ops here: "
                             f"{', '.join(known) or 'none'}")
        noisy += flag_noisy(rows)
        mode = runner.fast_mode(device)
        untimed = {"timed": None,
                   "checked": "the Triton kernels are not timed on the CPU (they run only in Triton's "
                              "interpreter, which checks them); the eager references are timed"}.get(
            mode, f"fast path {mode}: only the eager references ran and are timed")
        notes = [ceiling_note, machine] + ([untimed] if untimed else []) + skipped
        paths = results.save("ops", rows, out_dir, runner.COLUMNS, provenance=facts, notes=notes,
                             formats=formats)
        partials["ops"].finish()
        written += paths.values()
        if not args.no_plots:
            from .plots import plot_ops

            stem = next(iter(paths.values())).stem
            png = plot_ops(rows, out_dir / f"{stem}.png", f"gptfast ops on {facts['device']} ({facts['date_utc']})",
                           not_timed=untimed)
            if png is not None:
                written.append(png)
        failed |= _print_failures(rows)
        group_by, columns = SCREEN["ops"]
        tables.append(f"ops on {facts['device']} ({device})" + (f"; {untimed}" if untimed else "") + "\n\n"
                      + screen_table(rows, columns, group_by))
    if args.suite in ("e2e", "all"):
        from . import e2e

        partials["e2e"].columns = e2e.COLUMNS
        rows, notes = _run_e2e_matrix(device, models, dtypes, args, ceil, progress,
                                      lambda rows, notes: partials["e2e"].update(rows, notes + [ceiling_note]))
        noisy += flag_noisy(rows)
        notes = notes + [ceiling_note, machine] + skipped
        paths = results.save("e2e", rows, out_dir, e2e.COLUMNS, provenance=facts, notes=notes,
                             formats=formats)
        partials["e2e"].finish()
        written += paths.values()
        if not args.no_plots:
            from .plots import plot_e2e

            stem = next(iter(paths.values())).stem
            random = any("RANDOMLY INITIALISED" in n for n in notes)
            png = plot_e2e(rows, out_dir / f"{stem}.png", f"gptfast e2e on {facts['device']} ({facts['date_utc']})"
                           + ("; random weights: the speed is real, the text is noise" if random else ""))
            if png is not None:
                written.append(png)
        failed |= _print_failures(rows)
        group_by, columns = SCREEN["e2e"]
        tables.append(f"e2e on {facts['device']} ({device}; {', '.join(models)}; {', '.join(dtypes)})\n"
                      + "\n".join(textwrap.wrap(notes[0], 120)) + "\n\n"
                      + screen_table(rows, columns, group_by) + "\n\n"
                      + "\n".join(textwrap.wrap(SCREEN_LEGEND["e2e"], 120)))

    for table in tables:
        print("\n" + table)
    if noisy:
        print(f"\n{noisy} row(s) marked NOISY (repeats differ by > 10%): {machine}")
    print("\nwrote:\n" + "\n".join(f"  {p.name}" for p in written))
    print(f"results: {out_dir}")
    return 1 if failed else 0


def _choose_triton_interpreter(device: str, suite: str) -> str | None:
    """On the CPU, have Triton run the kernels in its interpreter, so the ops suite checks them.

    Triton picks its interpreter (`TRITON_INTERPRET=1`) when it is imported and each kernel is
    defined, so the variable is set here, where the command starts: `gptfast bench` and
    `python -m gptfast.bench` import neither triton nor gptfast's ops before this point. A
    program that imported them already and then calls `run_bench` gets the references only (the
    kernels unchecked) and the note this returns; the process is never restarted behind its back.
    Returns None when nothing was missed.
    """
    if device != "cpu" or suite not in ("ops", "all") or "TRITON_INTERPRET" in os.environ:
        return None
    if not _triton_importable():
        return None  # no Triton: the run says so itself
    if "triton" in sys.modules:
        return ("Triton was imported before the bench started, without its CPU interpreter: the kernels are "
                "not checked in this run, only the eager references are timed (run `gptfast bench`, or set "
                "TRITON_INTERPRET=1 before importing gptfast)")
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def _triton_importable() -> bool:
    """Whether `import triton` can work, found without importing it (that would be too early to
    choose the interpreter)."""
    import importlib.util

    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def _check_ops_names(names: list[str], device: str, quick: bool) -> None:
    """`--ops` names: each an op or an op module of the ops suite here, else a UsageError."""
    from ..cli_common import UsageError
    from . import runner

    known = set()
    for module_name, module in runner.discover():
        known.add(module_name.rsplit(".", 1)[-1])
        if not isinstance(module, BaseException):
            try:
                known.update(c.op for c in module.benchmark_cases(device, quick))
            except Exception:  # reported as an ERROR row by the run itself
                pass
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--ops: no ops case is named {', '.join(unknown)}; ops here: {', '.join(sorted(known))}")


def _run_e2e_matrix(device: str, models: list[str], dtypes: list[str], args, ceil, progress: bool,
                    on_rows=None):
    """The e2e suite for every (model, dtype), in that order; (all rows, notes). A run that raises
    gives an ERROR row and the others still run. With several runs each note names its run.
    `on_rows(rows, notes)` gets every row so far whenever a run has measured more."""
    from . import e2e

    rows: list[dict] = []
    notes: list[str] = []
    combos = [(m, d) for m in models for d in dtypes]
    for model, dtype in combos:
        label = f"{model} {dtype}: " if len(combos) > 1 else ""
        if len(combos) > 1:
            print(f"gptfast bench: e2e {model} {dtype}", flush=True)

        measured: list[dict] = []  # this run's rows handed over so far (kept if a later phase raises)

        def partial(got, got_notes, label=label, dtype=dtype):
            measured[:] = got
            if on_rows is not None:
                on_rows(rows + [dict(r, run_dtype=dtype) for r in got], notes + [label + n for n in got_notes])

        try:
            got, got_notes = e2e.run_e2e(device, dtype, args.quick, model=model, seed=args.seed,
                                         ceilings=ceil, progress=progress, on_rows=partial)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            note = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            got = list(measured) + [dict(suite="e2e", key=f"{model} | e2e | {dtype}", model=model, scenario="e2e",
                                         engine="-", dtype=dtype, status="ERROR", note=note, report=note)]
            got_notes = [f"the e2e run raised {note}"]
        finally:
            import gc

            gc.collect()
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        rows += [dict(r, run_dtype=dtype) for r in got]  # the run's dtype (an HF fp32 row sits in a bf16 run)
        notes += [label + n for n in got_notes]
        if on_rows is not None:
            on_rows(rows, notes)
    return rows, notes


def _print_failures(rows) -> bool:
    """Print the report of each failed or errored row; True if there was one."""
    bad = [r for r in rows if r.get("status") in ("FAIL", "ERROR")]
    for r in bad:
        print(f"\n{r['status']}: {r.get('op') or r.get('engine')} [{r.get('case') or r.get('scenario')}]\n"
              f"{r.get('report') or r.get('note')}")
    return bool(bad)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks` / `python -m gptfast.bench`."""
    from ..cli_common import OneLineErrorParser

    parser = OneLineErrorParser(prog="gptfast bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))

"""The ops suite: every op module's `benchmark_cases`, correctness first, then timing.

Case modules are found with `pkgutil` in `gptfast.bench.op_cases` (every module but private ones
that defines `benchmark_cases(device, quick)`): adding an op needs no edit here. For each
`BenchCase`:

1. check: the fast path `module.<op>` and the reference `module.<ref_name(op)>` run on copies of one
   fresh argument set; `case.check` (or `compare` with the case's atol/rtol) must pass. A case that
   fails is reported FAIL with the mismatch report and is never timed.
2. time: fast, eager reference, each `case.baselines` entry, then fast again (the spread of the
   two fast timings is the noise), rotating among several fresh argument sets so a case whose
   inputs fit in L2 is not timed out of cache.
3. report: µs, GB/s = bytes_moved / time, TFLOP/s = flops / time, % of the floor (the larger of
   bytes / measured copy bandwidth and flops / measured matmul rate), speedups.

On the CPU the fast path runs only through the Triton interpreter (`TRITON_INTERPRET=1`): it is
checked but not timed (interpreter time says nothing about the kernel); the reference is timed.
"""

from __future__ import annotations

import importlib
import itertools
import math
import pkgutil
import traceback
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import torch

from gptfast.ops import _triton
from gptfast.ops.common import compare, interpreting, ref_name

from .ceilings import Ceilings
from .op_cases import BenchCase

# Rotation: enough fresh argument sets that one pass over them exceeds this many bytes (twice an
# H100's 50 MB L2), capped in count and in memory.
ROTATE_BYTES = 100 << 20
MAX_ROTATIONS = 8
MAX_ROTATION_BYTES = 2 << 30

COLUMNS = [
    "op", "case", "status", "fast_us", "eager_us", "gbps", "tflops", "pct_floor", "bound",
    "speedup_eager", "speedup_baselines", "noise_pct", "note",
]


def discover(package: str = "gptfast.bench.op_cases") -> list[tuple[str, ModuleType | BaseException]]:
    """(module name, module or the exception importing it raised) for each case module in `package`."""
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        name = f"{package}.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a broken op module is reported, the others still run
            found.append((name, exc))
            continue
        if hasattr(module, "benchmark_cases"):
            found.append((name, module))
    return found


def clone_args(args: Any) -> Any:
    """A deep copy of an argument structure: tensors copied with their strides, the rest shared.

    Ops may write into their arguments (e.g. a KV cache), so fast and reference each get a copy.
    """
    if isinstance(args, torch.Tensor):
        out = torch.empty_strided(args.size(), args.stride(), dtype=args.dtype, device=args.device)
        return out.copy_(args)
    if isinstance(args, tuple):
        return tuple(clone_args(a) for a in args)
    if isinstance(args, list):
        return [clone_args(a) for a in args]
    if isinstance(args, dict):
        return {k: clone_args(v) for k, v in args.items()}
    return args


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    return []


def default_check(out_fast: Any, out_ref: Any, atol: float, rtol: float) -> str | None:
    """`compare` on each tensor of the two outputs, pairwise; None when all match."""
    fast, ref = _tensors(out_fast), _tensors(out_ref)
    if len(fast) != len(ref):
        return f"fast returned {len(fast)} tensors, reference {len(ref)}"
    if not fast:
        return "the op returned no tensor to compare (and wrote none into its arguments)"
    reports = [compare(a, e, atol, rtol, name=f"output {i}") for i, (a, e) in enumerate(zip(fast, ref))]
    reports = [r for r in reports if r is not None]
    return "\n".join(reports) if reports else None


def run_and_capture(fn: Callable, args: tuple) -> Any:
    """`fn(*copy of args)`; for an op that writes into its arguments and returns None, the copy."""
    mine = clone_args(args)
    out = fn(*mine)
    return mine if out is None else out


def rotation_count(case: BenchCase, device: str) -> int:
    """How many fresh argument sets to rotate among when timing `case` on `device`."""
    if not device.startswith("cuda"):
        return 2
    per_set = max(int(case.bytes_moved), 1)
    wanted = math.ceil(ROTATE_BYTES / per_set)
    return max(1, min(MAX_ROTATIONS, wanted, MAX_ROTATION_BYTES // per_set))


def rotating(fn: Callable, arg_sets: Sequence[tuple]) -> Callable[[], Any]:
    """A no-argument callable that calls `fn` on the next argument set each time."""
    cycle = itertools.cycle(arg_sets)
    return lambda: fn(*next(cycle))


def fast_mode(device: str) -> str:
    """How the fast path runs here: "timed" (CUDA), "checked" (interpreter), "n/a (no CUDA)" or
    "n/a (no Triton)" (Triton is not installed: only the references run)."""
    if not _triton.AVAILABLE:
        return "n/a (no Triton)"
    if device.startswith("cuda"):
        return "timed"
    return "checked" if interpreting() else "n/a (no CUDA)"


def _last_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def run_case(
    case: BenchCase,
    module: ModuleType,
    device: str,
    timer: Callable[[Callable[[], Any]], float],
    ceilings: Ceilings | None,
) -> dict:
    """Check, then time one case; returns its result row (see `COLUMNS`, plus JSON-only keys)."""
    row: dict[str, Any] = dict(
        key=f"{case.op} | {case.label}", suite="ops", op=case.op, case=case.label, module=module.__name__,
        status=None, report=None, note=None, bytes_moved=int(case.bytes_moved), flops=int(case.flops),
        params=dict(case.params), timed=None, primary=None, higher_is_better=False,
    )
    mode = fast_mode(device)
    fast = getattr(module, case.op, None)
    ref = getattr(module, ref_name(case.op), None)
    if fast is None or ref is None:
        missing = case.op if fast is None else ref_name(case.op)
        row.update(status="ERROR", report=f"{module.__name__} has no function {missing!r}")
        return row

    # 1. correctness, before any timing
    try:
        args = case.make_args()
        out_ref = run_and_capture(ref, args)
    except Exception as exc:
        row.update(status="ERROR", report=f"reference or make_args raised {_last_line(exc)}",
                   traceback=traceback.format_exc(limit=4))
        return row
    if mode == "n/a (no CUDA)":
        row.update(status="ref only", note="fast path n/a (no CUDA; set TRITON_INTERPRET=1 to check it)")
    elif mode == "n/a (no Triton)":
        row.update(status="ref only", note="fast path n/a: Triton is not installed")
    else:
        try:
            out_fast = run_and_capture(fast, args)
        except Exception as exc:
            row.update(status="FAIL", report=f"fast path raised {_last_line(exc)}")
            return row
        try:
            report = (case.check(out_fast, out_ref, args) if case.check is not None
                      else default_check(out_fast, out_ref, case.atol, case.rtol))
        except Exception as exc:
            report = f"the check raised {_last_line(exc)}"
        if report is not None:
            row.update(status="FAIL", report=report)
            return row
        row["status"] = "PASS"  # on the CPU: checked in the interpreter (the suite's note says so once)
    out_ref = out_fast = None  # free device memory before timing

    # 2. timing, rotating among fresh argument sets
    try:
        arg_sets = [args] + [case.make_args() for _ in range(rotation_count(case, device) - 1)]
        times: dict[str, float] = {}
        if mode == "timed":
            times["fast"] = timer(rotating(fast, arg_sets))
        times["eager"] = timer(rotating(ref, arg_sets))
        for name, fn in case.baselines.items():
            times[name] = timer(rotating(fn, arg_sets))
        main = "fast" if mode == "timed" else "eager"
        again = timer(rotating(fast if main == "fast" else ref, arg_sets))
    except Exception as exc:
        row.update(status="ERROR", report=f"timing raised {_last_line(exc)}")
        return row
    finally:
        arg_sets = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # 3. roofline units and speedups
    t = times[main]
    row.update(
        timed="triton" if main == "fast" else "eager",
        primary=f"{main}_us",
        fast_us=times.get("fast"),
        eager_us=times["eager"],
        noise_pct=abs(again - t) / min(again, t) * 100,
        gbps=case.bytes_moved / (t * 1e-6) / 1e9,
        tflops=case.flops / (t * 1e-6) / 1e12 if case.flops else None,
    )
    for name in case.baselines:
        row[f"{name}_us"] = times[name]
    if ceilings is not None:
        floor_us, bound = ceilings.floor_us(case.bytes_moved, case.flops)
        row.update(floor_us=floor_us, pct_floor=floor_us / t * 100, bound=bound)
    if main == "fast":
        row["speedup_eager"] = times["eager"] / t
        for name in case.baselines:
            row[f"speedup_{name}"] = times[name] / t
        if case.baselines:
            row["speedup_baselines"] = ", ".join(f"{n} {times[n] / t:.2f}×" for n in case.baselines)
    return row


def _wanted(case: BenchCase, module_name: str, ops: Iterable[str] | None) -> bool:
    if not ops:
        return True
    short = module_name.rsplit(".", 1)[-1]
    return any(name in (case.op, short) for name in ops)


def run_ops(
    device: str,
    quick: bool,
    ops: Sequence[str] | None = None,
    ceilings: Ceilings | None = None,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    modules: Sequence[tuple[str, ModuleType | BaseException]] | None = None,
    progress: bool = True,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run the ops suite; one row per case (plus one ERROR row per op module that failed to load).

    Parameters
    ----------
    device : str
        "cuda", "cuda:i" or "cpu": passed to each `benchmark_cases(device, quick)`.
    quick : bool
        The small subset the GPU check uses.
    ops : sequence of str, optional
        Keep only cases whose op name or module name (e.g. "attention") is listed.
    ceilings : Ceilings, optional
        For "% floor"; without it that column stays empty.
    timer : callable, optional
        `timer(fn) -> median µs`; default `timing.timer_for(device)`.
    modules : sequence, optional
        (name, module) pairs to run instead of `discover()` (tests use fake modules).
    progress : bool
        Show a tqdm bar on stderr.
    on_rows : callable, optional
        Called with the rows so far after every case (a partial result file).
    """
    from .timing import timer_for

    timer = timer or timer_for(device)
    modules = discover() if modules is None else modules
    rows: list[dict] = []
    work: list[tuple[BenchCase, ModuleType]] = []
    for name, module in modules:
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, BaseException):
            if not ops or short in ops:
                rows.append(dict(key=f"{short} | import", suite="ops", op=short, case="import",
                                 status="ERROR", report=f"import failed: {_last_line(module)}"))
            continue
        try:
            cases = module.benchmark_cases(device, quick)
        except Exception as exc:
            rows.append(dict(key=f"{short} | benchmark_cases", suite="ops", op=short, case="benchmark_cases",
                             status="ERROR", report=f"benchmark_cases raised {_last_line(exc)}"))
            continue
        work += [(case, module) for case in cases if _wanted(case, name, ops)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(work), desc="ops", unit="case", leave=False)
    for case, module in work:
        if bar is not None:
            bar.set_postfix_str(f"{case.op} {case.label}"[:60])
        rows.append(run_case(case, module, device, timer, ceilings))
        if on_rows is not None:
            on_rows(rows)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows

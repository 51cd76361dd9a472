"""The ops suite's benchmark cases, kept out of the op files (`gptfast/ops/`).

Each module here is one group of the suite (`gptfast bench --suite ops --ops <group>` runs it,
as does `--ops <op>`), and defines `benchmark_cases(device, quick) -> list[BenchCase]`. The
runner (`gptfast.bench.runner`) finds the modules by name, in name order, and times the fast
path `module.<op>` against the reference `module.<ref_name(op)>`, so each module imports the ops
it measures under their own names. A new op's cases go in a new module (or the group of the ops
it fuses): nothing else needs an edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class BenchCase:
    """One benchmark configuration of an op (see `benchmark_cases`).

    `make_args()` returns fresh random positional args (called once per rotation buffer), so the
    runner can rotate inputs. `fast` and `ref` are called with the same args; `check(out_fast,
    out_ref, args)` returns None or a mismatch report (default: `compare` with `atol`/`rtol`).
    `bytes_moved` and `flops` are the op's minimum DRAM traffic and arithmetic, for roofline units.
    """

    op: str  # the op's name: module attribute `op` is the fast path, `ref_name(op)` the reference
    label: str  # one table row: e.g. "B=8 T=1024 H=12 D=64 bf16"
    make_args: Callable[[], tuple]
    bytes_moved: int
    flops: int = 0
    atol: float = 1e-5
    rtol: float = 1e-5
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # sizes for plots / JSON
    check: Callable[[Any, Any, tuple], str | None] | None = None
    # extra baselines, e.g. {"sdpa": fn}: timed with the same args, reported beside eager
    baselines: dict[str, Callable] = dataclasses.field(default_factory=dict)


def lazy_generator(device: str, seed: int) -> Callable[[], torch.Generator]:
    """A seeded generator on `device`, created at the first call (so listing the CUDA benchmark
    cases needs no GPU); successive draws give fresh inputs for rotation."""
    holder: list[torch.Generator] = []

    def get() -> torch.Generator:
        if not holder:
            holder.append(torch.Generator(device=device).manual_seed(seed))
        return holder[0]

    return get


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as the case labels show it: `torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")

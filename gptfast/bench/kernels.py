"""`gptfast kernels`: every GPU kernel of the decode step and the prefill, compiled and counted
on a machine without a GPU.

Two measurements that need no GPU:

- **Compiled variants.** The real launchers (`gptfast.ops`) run on CPU tensors of the real
  shapes while every Triton launch is intercepted and compiled for a GPU target (`sm_90`,
  `sm_89`, `sm_80`) by Triton's own compiler and the `ptxas` shipped in the Triton wheel,
  instead of run. Per compiled variant: constexprs, num_warps/num_stages, registers, spill
  bytes, stack frame and shared memory (`ptxas -v` on the variant's PTX), CTAs per SM from
  registers, shared memory and warps, and the compile seconds.
- **One decode step, counted.** The function a decode CUDA graph captures
  (`DecodeGraphRunner._step`) runs along the CUDA branches (`gptfast.ops.as_cuda`) once per
  batch-size bucket, for the "sample", "greedy" (the fused greedy head, GEMV buckets) and
  "logits" graphs. Every Triton launch and every
  non-view PyTorch op that launches a kernel on CUDA (cuBLAS GEMMs, copies, glue) is recorded
  with its name, its grid and the bytes it must move; the PyTorch ops run on shapes only
  (meta tensors), so nothing is computed. Ops that make the host wait for the device
  (`.item()`, `nonzero`, boolean-mask indexing, tensors made from host data) are flagged.

Bytes per launch: every tensor argument's extent (distinct memory counted once: inputs and
outputs), except the paged K/V cache, counted as the tokens the launch attends to (the step's
`seq_lens`) or writes (its `slot_mapping`). It is the traffic a launch cannot avoid if each
byte crosses DRAM once: the step's memory floor, kernel by kernel. Each kernel's bytes are also
shown as a share of the weight-read floor (every weight of the model once, the position table
apart: a step gathers one row of it per sequence), the least any decode step moves.

With `quantize="int8"` the model is built as `GPT2.from_pretrained(..., quantize="int8")` builds
it: every block's linears and the head run the int8 GEMV (`gptfast.ops.int8_linear`) on int8
copies of their weights, made before the walk as a GPU's warm-up step makes them (a replayed
graph makes none). The weight-read floor then counts each quantised matrix as its int8 copy:
1 byte per weight and a 4-byte scale per output channel.

Limits: registers and spills are ptxas's for the target; a GPU runs the same binary. Which
cuBLAS kernel a GEMM picks (split-K adds a reduce kernel) is decided at run time on the GPU: a
GEMM counts as one kernel here. The SM count (it sizes the split-KV grid) is the target's
reference GPU unless `--sm-count` says otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["TARGETS", "Target", "ctas_per_sm", "inspect_kernels", "add_kernels_arguments", "run_kernels"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU architecture's limits for the occupancy estimate (CUDA C Programming Guide,
    "Compute Capabilities" table), and the SM count of its reference GPU."""

    name: str  # "sm_90"
    capability: int  # 90
    sm_count: int  # of the reference GPU named in `gpu`
    gpu: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 233472  # bytes
    smem_per_cta: int = 232448  # bytes, the opt-in maximum one CTA may use
    reserved_smem_per_cta: int = 1024  # the driver's, per resident CTA


TARGETS = {
    "sm_90": Target("sm_90", 90, 132, "H100 SXM / H200"),
    "sm_89": Target("sm_89", 89, 128, "RTX 4090", max_warps_per_sm=48, max_ctas_per_sm=24,
                    smem_per_sm=102400, smem_per_cta=101376),
    "sm_80": Target("sm_80", 80, 108, "A100", smem_per_sm=167936, smem_per_cta=166912),
}

# Register allocation: per warp, in units of 256 registers; warps are granted in groups of 4.
_REG_UNIT = 256
_WARP_GRANULARITY = 4


def ctas_per_sm(registers: int, smem_bytes: int, num_warps: int, target: Target) -> int:
    """CTAs of one kernel resident on an SM at once: the tightest of the register, shared-memory,
    warp and CTA limits (0 when one CTA does not fit).

    Parameters
    ----------
    registers : int
        Registers per thread (ptxas).
    smem_bytes : int
        Shared memory per CTA (static + dynamic), bytes.
    num_warps : int
        Warps per CTA.
    target : Target

    Examples
    --------
    >>> ctas_per_sm(113, 0, 16, TARGETS["sm_90"])  # 120 registers x 32 lanes x 16 warps
    1
    """
    if num_warps < 1 or registers < 0 or smem_bytes < 0:
        raise ValueError(f"ctas_per_sm: need num_warps >= 1, registers >= 0, smem_bytes >= 0; got "
                         f"{num_warps}, {registers}, {smem_bytes}")
    if registers > target.max_regs_per_thread or smem_bytes > target.smem_per_cta:
        return 0
    regs_per_warp = -(-max(registers, 1) * 32 // _REG_UNIT) * _REG_UNIT
    warps_by_regs = target.regs_per_sm // regs_per_warp // _WARP_GRANULARITY * _WARP_GRANULARITY
    limits = [warps_by_regs // num_warps, target.max_warps_per_sm // num_warps, target.max_ctas_per_sm,
              target.smem_per_sm // (smem_bytes + target.reserved_smem_per_cta)]
    return max(0, min(limits))


# ------------------------------------------------------------------------------------------
# compile-only Triton: a driver that reports a target without a device, launches compiled only
# ------------------------------------------------------------------------------------------


def _compile_only_driver(target: Target):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """Reports `target` as the current device's; has no device, stream or launcher."""

        def __init__(self):
            super().__init__()
            self.target = GPUTarget("cuda", target.capability, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("gptfast kernels compiles only: no launcher is built")

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("gptfast kernels compiles only: nothing can be timed")

        # COMPAT(triton 3.6): JITFunction.run keys its per-device binder (which holds the target)
        # by get_current_device(): one key per target, so two targets in one process never share.
        def get_current_device(self):
            return f"gptfast-compile-only-{target.name}"

        def get_current_stream(self, device=None):
            return 0

    return CompileOnlyDriver()


@dataclasses.dataclass
class Launch:
    """One kernel launch of a recorded step."""

    name: str  # Triton kernel name, or the PyTorch op ("aten.mm")
    kind: str  # "triton" or "torch"
    grid: tuple | None  # Triton only
    bytes: int
    variant: str | None = None  # Triton: the compiled variant's hash


@dataclasses.dataclass
class Variant:
    kernel: str
    hash: str
    constexprs: dict
    specialization: str
    num_warps: int
    num_stages: int
    smem_bytes: int
    compile_s: float
    ptx: str = dataclasses.field(repr=False, default="")


class _Session:
    """What one walk records: the launches and host syncs of the step being recorded (lists while
    `_recorded` runs one, None otherwise) and every compiled variant (all steps)."""

    def __init__(self, target: Target):
        self.target = target
        self.launches: list[Launch] | None = None
        self.syncs: list[str] | None = None
        self.variants: dict[str, Variant] = {}
        self.cache_ids: set = set()  # storage addresses of the paged K/V cache

    # --- Triton ---------------------------------------------------------------------------
    def triton_launch(self, fn, compile_: Callable, args: tuple, kwargs: dict, grid) -> Any:
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        params = list(inspect.signature(fn.fn).parameters)
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        t0 = time.perf_counter()
        kernel = compile_()
        seconds = time.perf_counter() - t0
        meta = kernel.metadata
        if meta.hash not in self.variants:
            constexprs = {fn.arg_names[i]: _plain(bound.get(fn.arg_names[i])) for i in fn.constexprs
                          if fn.arg_names[i] in bound}
            self.variants[meta.hash] = Variant(meta.name, meta.hash, constexprs, _specialization(fn, kernel),
                                               meta.num_warps, meta.num_stages, meta.shared, seconds,
                                               kernel.asm["ptx"])
        if self.launches is not None:
            if callable(grid):
                grid = grid(bound)
            grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            named = [(k, v) for k, v in bound.items() if isinstance(v, torch.Tensor)]
            with _disable_current_modes():  # reading seq_lens here is the tool's, not the step's
                nbytes = self._triton_bytes(meta.name, named, bound)
            self.launches.append(Launch(meta.name, "triton", grid, nbytes, meta.hash))
        return kernel

    def _triton_bytes(self, kernel: str, named: list, bound: dict) -> int:
        args = dict(named)
        rules = dict(_PARTIAL_ARGS)
        for (name, flag), extra in _PARTIAL_ARGS_IF.items():
            if name == kernel and bound.get(flag):
                rules.update({(kernel, arg): index for arg, index in extra.items()})
        cache_tokens = 0  # tokens of the paged cache the launch attends to, or writes
        if "seq_lens_ptr" in args:  # attention: every key of every sequence
            cache_tokens = int(args["seq_lens_ptr"].sum())
        elif "slot_ptr" in args:  # a K/V write: one slot per new token
            cache_tokens = int(args["slot_ptr"].numel())
        sized = []
        for name, t in named:
            rule = rules.get((kernel, name), "whole")
            if t.untyped_storage().data_ptr() in self.cache_ids:
                sized.append((t, t[0, 0].numel() * t.element_size() * cache_tokens))  # [H, D] per token
            elif rule == "whole":
                sized.append((t, _extent(t)))
            elif rule is not None:  # one row per element of the index argument
                sized.append((t, t[0].numel() * t.element_size() * args[rule].numel()))
        return _distinct_bytes(sized)

    # --- PyTorch ops ------------------------------------------------------------------------
    def torch_op(self, name: str, inputs: list, outputs: list, sync: str | None) -> None:
        if self.launches is None:
            return
        if sync is not None:
            self.syncs.append(sync)
        if name in _GATHERS:  # reads one source row per output row: the output's size again
            sized = [(t, _extent(t)) for t in inputs[1:]] + [(t, 2 * _extent(t)) for t in outputs]
        else:
            sized = [(t, _extent(t)) for t in inputs + outputs]
        self.launches.append(Launch(name, "torch", None, _distinct_bytes(sized)))


# Triton arguments a kernel touches only in part, by (kernel, argument): the name of an index
# argument (one row gathered per index), or None for data-dependent scratch memory (not part of
# the floor). Every other tensor argument counts whole, the paged K/V cache by its tokens.
_PARTIAL_ARGS = {
    ("_embed_layernorm_kernel", "wte_ptr"): "tok_ptr",
    ("_embed_layernorm_kernel", "wpe_ptr"): "pos_ptr",
    ("_sample_kernel", "scratch_x_ptr"): None,
    ("_sample_kernel", "scratch_col_ptr"): None,
}
# The same, for arguments that are gathered only in a variant: (kernel, constexpr) -> rules.
# `_ln_linear_kernel` with EMBED=True (the GEMV path's first block) reads x_ptr as wte by token id.
_PARTIAL_ARGS_IF = {
    ("_ln_linear_kernel", "EMBED"): {"x_ptr": "tok_ptr", "wpe_ptr": "pos_ptr"},
}
# PyTorch ops that gather rows of their first argument (the source counts as the rows read).
_GATHERS = {"aten.index_select", "aten.embedding"}


def _distinct_bytes(sized: list) -> int:
    """Sum of (tensor, bytes) pairs, a tensor passed twice (e.g. an unused placeholder) once."""
    seen, total = set(), 0
    for t, nbytes in sized:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def _extent(t) -> int:
    """Bytes spanned by a strided view (its elements, plus the gaps between them)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return span * t.element_size()


def _specialization(fn, kernel) -> str:
    """What Triton specialised the variant on besides the constexprs: integer arguments equal to
    1 ("N=1") or divisible by 16 ("C%16"), and pointers NOT 16-byte aligned ("pos_ptr%1")."""
    src = kernel.src
    parts = []
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            continue
        ty = src.signature.get(name)
        aligned = any(a[0] == "tt.divisibility" for a in src.attrs.get((i,), []))
        if ty == "constexpr":
            parts.append(f"{name}={src.constants.get((i,))}")
        elif ty is not None and ty.startswith("*"):
            if not aligned:
                parts.append(f"{name}%1")
        elif aligned:
            parts.append(f"{name}%16")
    return " ".join(parts)


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def _compile_only(session: _Session):
    """Triton launches compile for `session.target` and are recorded instead of run."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    # COMPAT(triton 3.6): `kernel[grid](...)` calls JITFunction.run(..., grid=, warmup=False);
    # warmup=True compiles (binder, specialisation, cache, compile) and returns the
    # CompiledKernel without launching it.
    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=True, **kwargs)
        return session.triton_launch(self, lambda: original(self, *args, grid=grid, warmup=True, **kwargs),
                                     args, kwargs, grid)

    # COMPAT(triton 3.6): DriverConfig has no getter that leaves the active driver unset
    # (`active` creates the default one, which fails without a GPU): keep the attribute itself.
    previous = driver._active
    driver.set_active(_compile_only_driver(session.target))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original
        driver.set_active(previous)


# ------------------------------------------------------------------------------------------
# PyTorch ops: recorded on shapes only, host syncs flagged
# ------------------------------------------------------------------------------------------

# Ops that make the host wait for the device (or copy host data in) inside a step.
_SYNC_OPS = {
    "aten._local_scalar_dense": "reads a device value on the host (.item(), int(), float())",
    "aten.item": "reads a device value on the host (.item(), int(), float())",
    "aten.is_nonzero": "a tensor's truth value on the host (if tensor: ...)",
    "aten.nonzero": "output size depends on the data",
    "aten.masked_select": "output size depends on the data",
    "aten.unique": "output size depends on the data",
    "aten._unique2": "output size depends on the data",
    "aten.unique_consecutive": "output size depends on the data",
    "aten.equal": "returns a host bool",
    "aten.lift_fresh": "a tensor made from host data (torch.tensor(...))",
    "aten.lift_fresh_copy": "a tensor made from host data (torch.tensor(...))",
}
# Ops that launch no kernel on CUDA: allocation and metadata (views are found by their schema).
_NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty",
              "aten.new_empty_strided", "aten.lift_fresh", "aten.lift_fresh_copy", "aten._local_scalar_dense",
              "aten.item", "aten.detach", "aten.detach_",
              "aten.is_nonzero", "aten.resize_", "aten.set_", "aten.sym_size", "aten.sym_stride",
              "aten.sym_numel", "aten.sym_storage_offset", "aten.record_stream"}


def _op_name(func) -> str:
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


def _sync_reason(name: str, func, args, kwargs) -> str | None:
    import torch

    if name in _SYNC_OPS:
        return _SYNC_OPS[name]
    if name in ("aten.index", "aten.index_put", "aten.index_put_") and len(args) > 1:
        indices = args[1] or []
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean-mask indexing (output size depends on the data)"
    if name == "aten.repeat_interleave" and func._overloadname.startswith("Tensor"):
        return "repeat_interleave without output_size"
    if name in ("aten.to", "aten._to_copy", "aten.copy_") and any(
            str(a) == "cpu" for a in (*args[1:], kwargs.get("device"))):
        return "a copy to the host (.cpu(), .to('cpu'), .tolist() of a device tensor)"
    return None


def _where() -> str:
    """The innermost frame outside this module and torch: where a flagged op was called."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if path.endswith("gptfast/bench/kernels.py") or "/torch/" in path or path.endswith("contextlib.py"):
            continue
        return f"{'/'.join(path.split('/')[-2:])}:{frame.lineno} ({frame.name})"
    return "?"


def _shape_only(func, args, kwargs):
    """`func`'s outputs, allocated but not computed (shapes from its meta kernel); in-place and
    out= ops return the arguments they would write. Ops without a meta kernel run for real."""
    import torch
    from torch.utils._pytree import tree_map_only

    schema = func._schema
    values = {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema.arguments)}
    written = {}
    for a in schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write:
            written[frozenset(a.alias_info.before_set)] = values[a.name]
    if written and all(r.alias_info is not None for r in schema.returns):
        outs = [written[frozenset(r.alias_info.before_set)] for r in schema.returns]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def to_meta(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    try:
        out = func(*tree_map_only(torch.Tensor, to_meta, args), **tree_map_only(torch.Tensor, to_meta, kwargs))
    except (NotImplementedError, RuntimeError):
        return func(*args, **kwargs)
    return tree_map_only(torch.Tensor, lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype), out)


def _tensors(tree) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _op_recorder(session: _Session):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OpRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = _op_name(func)
            sync = _sync_reason(name, func, args, kwargs)
            flagged = f"{name} at {_where()}: {sync}" if sync is not None else None
            if name in _NO_KERNEL or torch.Tag.inplace_view in func.tags:
                if flagged is not None and session.syncs is not None:
                    session.syncs.append(flagged)  # e.g. .item(): a copy to the host, no kernel
                return func(*args, **kwargs)
            if func.is_view:
                # A schema that may alias (`to`, `reshape`, `contiguous` in inference mode) copies
                # when its output shares no memory with its inputs: then it is a kernel.
                out = func(*args, **kwargs)
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                if all(t.untyped_storage().data_ptr() in inputs for t in outs):
                    return out
                session.torch_op(name, _tensors((args, kwargs)), outs, flagged)
                return out
            # a flagged op runs for real: the host code after it sees real values
            out = func(*args, **kwargs) if sync is not None else _shape_only(func, args, kwargs)
            session.torch_op(name, _tensors((args, kwargs)), _tensors(out), flagged)
            return out

    return OpRecorder()


# ------------------------------------------------------------------------------------------
# ptxas -v
# ------------------------------------------------------------------------------------------

# ptxas -v prints, per kernel, "N bytes stack frame, N bytes spill stores, N bytes spill loads" and
# "Used N registers[, used N barriers][, N bytes smem]": the first four figures are always there
# (required, so that a changed wording fails instead of reading as 0), the others only when non-zero.
_PTXAS_REQUIRED = {
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}
_PTXAS_OPTIONAL = {
    "barriers": re.compile(r"used (\d+) barriers"),
    "static_smem_bytes": re.compile(r"(\d+) bytes smem"),
}


def _parse_ptxas(log: str) -> dict:
    """The figures of one kernel's `ptxas -v` log, and its two resource lines as printed (`ptxas`:
    the record a reader can check the figures against). Raises RuntimeError when a required
    figure is missing."""
    info = {}
    for field, pattern in _PTXAS_REQUIRED.items():
        m = pattern.search(log)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no {field} ({pattern.pattern!r} not found):\n{log[-2000:]}")
        info[field] = int(m.group(1))
    for field, pattern in _PTXAS_OPTIONAL.items():
        m = pattern.search(log)
        info[field] = int(m.group(1)) if m else 0
    lines = [line.strip().removeprefix("ptxas info    :").strip() for line in log.splitlines()
             if "bytes stack frame" in line or "Used " in line]
    info["ptxas"] = "; ".join(lines)
    return info


def _ptxas_info(ptx: str, capability: int) -> dict:
    """Registers, spills, stack frame, barriers of a PTX kernel: `ptxas -v` (the one in the Triton
    wheel, with Triton's own flags), cached on disk in Triton's cache by the PTX's hash."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.runtime.cache import get_cache_manager

    arch = sm_arch_from_capability(capability)
    key = hashlib.sha256(f"gptfast-ptxas-v2 {arch}\n{ptx}".encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file("ptxas.json")
    if cached is not None:
        return json.loads(Path(cached).read_text())
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed (exit {done.returncode}) for {arch}:\n{log[-2000:]}")
    info = _parse_ptxas(log)
    cache.put(json.dumps(info), "ptxas.json", binary=False)
    return info


# ------------------------------------------------------------------------------------------
# the walk
# ------------------------------------------------------------------------------------------

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _check_jit_kernels() -> None:
    from triton.runtime.jit import JITFunction

    from gptfast.ops import attn_decode

    if not isinstance(attn_decode._decode_split_kernel, JITFunction):
        raise RuntimeError(
            "gptfast kernels compiles the Triton kernels for a GPU, but they were defined for Triton's "
            "CPU interpreter (TRITON_INTERPRET=1 was set when gptfast was imported); run it without "
            "TRITON_INTERPRET")


def _empty_model(model: str, dtype, block_size: int, num_kv_blocks: int, quantize: str | None = None):
    """The model with uninitialised weights on the CPU (nothing reads their values); with
    `quantize`, its int8 copies made already (quantised from those values), as a GPU's warm-up
    step makes them before a graph is captured: no recorded step makes them."""
    import torch

    from gptfast.config import get_config
    from gptfast.model import GPT2

    config = get_config(model)
    with torch.inference_mode(False):
        with torch.device("meta"):
            net = GPT2(config, block_size=block_size, num_kv_blocks=num_kv_blocks)
        net = net.to(dtype=dtype).to_empty(device="cpu").quantize_weights(quantize)
        net.refresh_weight_copies()
        return net


def _weight_floor(net) -> int:
    """Bytes a decode step must read of the weights: every parameter once, the position table
    apart (a step gathers one row of it per sequence); in a quantised model each matrix that runs
    on an int8 copy (every block's linears, the head) counts as that copy, 1 byte per weight and
    an fp32 scale per output channel (`gptfast.quant`), instead of the float parameter."""
    import torch

    from gptfast.model import Linear

    quantised = {}
    if net.quantize is not None:
        matrices = [m.weight for m in net.modules() if isinstance(m, Linear)] + [net.head_weight()]
        quantised = {id(w): w for w in matrices}
    total = 0
    for p in net.parameters():
        if p is net.wpe.weight:
            continue
        if id(p) in quantised:
            total += p.numel() * torch.int8.itemsize + p.shape[0] * torch.float32.itemsize
        else:
            total += p.numel() * p.element_size()
    return total


def _step_record(session: _Session, launches: list[Launch], syncs: list[str], extra: dict) -> dict:
    triton = sum(1 for x in launches if x.kind == "triton")
    return dict(**extra, kernels=len(launches), triton=triton, other=len(launches) - triton,
                names=[x.name for x in launches], grids=[list(x.grid) if x.grid else None for x in launches],
                bytes=[x.bytes for x in launches], total_bytes=sum(x.bytes for x in launches),
                host_syncs=list(syncs))


def _recorded(session: _Session, fn: Callable) -> tuple[list[Launch], list[str]]:
    import torch

    session.launches, session.syncs = [], []
    try:
        with torch.inference_mode(), _op_recorder(session):
            fn()
        return session.launches, session.syncs
    finally:
        session.launches = session.syncs = None


def inspect_kernels(model: str = "gpt2", dtypes: Iterable[str] = ("bf16",), target: str = "sm_90",
                    buckets: Iterable[int] | None = None, context: int | None = None,
                    prefill_lens: Iterable[int] = (128, 77), sm_count: int | None = None,
                    quantize: str | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Compile every Triton kernel variant of the decode step (every bucket; "sample", "logits"
    and, where the runner has it, "greedy" graphs) and the prefill for a GPU target, and count the
    kernels of each step.

    Parameters
    ----------
    model : str
        A gptfast preset (the shapes; weights are not needed).
    dtypes : iterable of str
        Model dtypes from "bf16", "fp16", "fp32".
    target : str
        "sm_90" (default), "sm_89" or "sm_80".
    buckets : iterable of int, optional
        Decode batch-size buckets (default: every bucket of a 256-row runner).
    context : int, optional
        Keys each sequence attends to in the decode step, for the bytes (default n_positions / 2).
    prefill_lens : iterable of int
        Prompt lengths of the one prefill step walked.
    sm_count : int, optional
        SMs assumed (sizes the split-KV grid); default: the target's reference GPU.
    quantize : None or "int8"
        The model's weights as `GPT2.from_pretrained(..., quantize=)` takes them: "int8" runs every
        block's linears and the head on int8 copies (the int8 GEMV), for every dtype walked.
    log : callable
        Progress lines.

    Returns
    -------
    dict with target, sm_count, model, dtypes, quantize, context, decode_steps (list of dicts: dtype,
    bucket, graph, kernels, triton, other, names, grids, bytes, total_bytes, weight_bytes (the
    weight-read floor, `_weight_floor`: every parameter byte once, the position table apart, int8
    matrices as their copies), host_syncs), prefill (one such dict per dtype, with tokens),
    variants (list of dicts: kernel, dtype, quantize, target, hash, constexprs, num_warps,
    num_stages, registers, spill_bytes, stack_bytes, smem_bytes, barriers, ctas_per_sm,
    compile_s, ptxas: ptxas's resource lines the figures are read from).

    Examples
    --------
    >>> report = inspect_kernels("gpt2", ["bf16"], buckets=[1])  # doctest: +SKIP
    >>> report["decode_steps"][0]["kernels"]  # doctest: +SKIP
    """
    import torch

    from gptfast import ops, quant
    from gptfast.config import get_config
    from gptfast.graphs import MAX_BATCH, DecodeGraphRunner, buckets_up_to
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    tgt = TARGETS[target]
    sm_count = tgt.sm_count if sm_count is None else sm_count
    quant.check_mode(quantize)
    _check_jit_kernels()
    config = get_config(model)
    all_buckets = buckets_up_to(MAX_BATCH)
    buckets = all_buckets if buckets is None else sorted(set(buckets))
    bad = [b for b in buckets if b not in all_buckets]
    if bad:
        raise ValueError(f"buckets {bad} are not decode buckets; the buckets are {all_buckets}")
    context = config.n_positions // 2 if context is None else context
    if not 1 <= context <= config.n_positions:
        raise ValueError(f"context must be in 1..n_positions={config.n_positions}, got {context}")
    prefill_lens = list(prefill_lens)
    if not prefill_lens or any(not 1 <= n <= config.n_positions for n in prefill_lens):
        raise ValueError(f"prefill_lens must be lengths in 1..{config.n_positions}, got {prefill_lens}")
    block_size = 16
    max_blocks = -(-config.n_positions // block_size)
    session = _Session(tgt)
    steps, prefills, variant_dtype = [], [], {}
    with _compile_only(session), ops.as_cuda(sm_count):
        for dtype_name in dtypes:
            if dtype_name not in _DTYPE_NAMES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {dtype_name!r}")
            dtype = getattr(torch, _DTYPE_NAMES[dtype_name])
            # NOTE: every row's table points at the same blocks: nothing is written, and the pool
            # stays small at any batch (the kernels see the real table width and cache strides).
            net = _empty_model(model, dtype, block_size, max_blocks + 1, quantize)
            cache = net.kv_cache
            session.cache_ids = {t.untyped_storage().data_ptr() for t in (cache.k, cache.v)}
            # NOTE: the default runner's size: its buffer layout (field offsets) sets the pointer
            # alignment Triton specialises on.
            runner = DecodeGraphRunner(net, MAX_BATCH)
            weight_bytes = _weight_floor(net)
            runner.load(_decode_rows(MAX_BATCH, context, block_size, max_blocks))
            for bucket in buckets:
                graphs = ("sample", "greedy", "logits") if runner.has_greedy_head(bucket) else ("sample", "logits")
                for graph in graphs:
                    t0 = time.perf_counter()
                    launches, syncs = _recorded(session, lambda: runner._step(bucket, graph))
                    for x in launches:
                        if x.variant is not None:
                            variant_dtype.setdefault(x.variant, set()).add(dtype_name)
                    steps.append(_step_record(session, launches, syncs,
                                              dict(dtype=dtype_name, bucket=bucket, graph=graph,
                                                   weight_bytes=weight_bytes)))
                    log(f"{dtype_name} bucket {bucket} {graph}: {len(launches)} kernels "
                        f"({time.perf_counter() - t0:.1f}s)")
            tokens, positions, meta, last = _prefill_inputs(prefill_lens, block_size, max_blocks)
            launches, syncs = _recorded(session, lambda: net.forward_paged(tokens, positions, meta, last,
                                                                           fp32_logits=False))
            for x in launches:
                if x.variant is not None:
                    variant_dtype.setdefault(x.variant, set()).add(dtype_name)
            prefills.append(_step_record(session, launches, syncs,
                                         dict(dtype=dtype_name, tokens=sum(prefill_lens), lens=prefill_lens)))
            log(f"{dtype_name} prefill {prefill_lens}: {len(launches)} kernels")
            runner = net = None  # freed before the next dtype's model is built
    variants = []
    for v in session.variants.values():
        info = _ptxas_info(v.ptx, tgt.capability)
        for dtype_name in sorted(variant_dtype.get(v.hash, ())):
            variants.append(dict(
                kernel=v.kernel, dtype=dtype_name, quantize=quantize, target=tgt.name, hash=v.hash[:16],
                constexprs=v.constexprs, specialization=v.specialization,
                num_warps=v.num_warps, num_stages=v.num_stages, registers=info["registers"],
                spill_bytes=info["spill_store_bytes"] + info["spill_load_bytes"],
                spill_store_bytes=info["spill_store_bytes"], spill_load_bytes=info["spill_load_bytes"],
                stack_bytes=info["stack_bytes"], smem_bytes=v.smem_bytes + info["static_smem_bytes"],
                smem_limit=tgt.smem_per_cta, barriers=info["barriers"],
                ctas_per_sm=ctas_per_sm(info["registers"], v.smem_bytes + info["static_smem_bytes"],
                                        v.num_warps, tgt),
                compile_s=round(v.compile_s, 3), ptxas=info["ptxas"]))
    variants.sort(key=lambda r: (r["kernel"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True)))
    return dict(model=model, dtypes=list(dtypes), quantize=quantize, target=tgt.name, target_gpu=tgt.gpu,
                sm_count=sm_count, context=context, block_size=block_size, decode_steps=steps, prefill=prefills,
                variants=variants)


def _decode_rows(rows: int, context: int, block_size: int, max_blocks: int):
    """A synthetic decode batch for the runner: every row at position context - 1, its table
    naming blocks 1..max_blocks, sampled at temperature 1."""
    import numpy as np

    from gptfast.batch import DecodeBatch, SamplingRows

    def full(value, dtype):
        return np.full(rows, value, dtype=dtype)

    sampling = SamplingRows([], full(0, np.int64), full(1.0, np.float32), full(0, np.int32), full(1.0, np.float32),
                            eager_processing=False, min_new=None)
    tables = np.tile(np.arange(1, max_blocks + 1, dtype=np.int32), (rows, 1))
    return DecodeBatch([], full(0, np.int64), full(0, np.int64), full(context - 1, np.int64),
                       full(block_size + context - 1, np.int64), full(context, np.int32), tables,
                       full(0, np.int64), sampling)


def _prefill_inputs(lens: list[int], block_size: int, max_blocks: int) -> tuple:
    """`forward_paged` arguments of one prefill step: prompts of `lens` tokens, fresh sequences
    (no cached prefix), made on the host as the engine makes them (outside the counted step)."""
    import torch

    from gptfast.kv_cache import AttnMetadata

    starts = [0]
    for length in lens:
        starts.append(starts[-1] + length)
    meta = AttnMetadata(
        slot_mapping=torch.cat([torch.arange(block_size, block_size + n) for n in lens]),
        block_tables=torch.arange(1, max_blocks + 1, dtype=torch.int32).repeat(len(lens), 1),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        cu_seqlens_q=torch.tensor(starts, dtype=torch.int32),
        max_seqlen_q=max(lens),
        is_decode=False,
    )
    tokens = torch.zeros(starts[-1], dtype=torch.int64)
    positions = torch.cat([torch.arange(n) for n in lens])
    last = torch.tensor(starts[1:]) - 1  # each sequence's last row: its logits
    return tokens, positions, meta, last


# ------------------------------------------------------------------------------------------
# command line: gptfast kernels
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fresh_triton_cache():
    """Triton's cache (compiled variants, and the ptxas figures kept beside them) in an empty
    temporary folder for the duration."""
    from triton import knobs

    previous = knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="gptfast-kernels-") as tmp:
        knobs.cache.dir = tmp
        try:
            yield
        finally:
            knobs.cache.dir = previous


def _bucket_list(text: str) -> list[int] | None:
    import argparse

    if text == "all":
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be 'all' or comma-separated ints, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no bucket given")
    return values


def _dtype_list(text: str) -> list[str]:
    import argparse

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in _DTYPE_NAMES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"dtypes must be comma-separated from {', '.join(_DTYPE_NAMES)}, got {text!r}")
    return values


def add_kernels_arguments(parser) -> None:
    """Add the `gptfast kernels` options to an argparse parser."""
    parser.add_argument("--model", default="gpt2", help="a gptfast preset: the shapes (default gpt2)")
    parser.add_argument("--dtype", "--dtypes", type=_dtype_list, default=["bf16"], metavar="DTYPE[,DTYPE...]",
                        help="model dtype(s), comma-separated from bf16,fp16,fp32 (default bf16)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="walk the model with int8 weights, as GPT2.from_pretrained(..., quantize='int8') runs "
                             "it: every block's linears and the head on the int8 GEMV (default: float weights)")
    parser.add_argument("--target", choices=sorted(TARGETS), default="sm_90",
                        help="GPU architecture to compile for (default sm_90: H100/H200)")
    parser.add_argument("--buckets", type=_bucket_list, default=None, metavar="all|B[,B...]",
                        help="decode batch-size buckets to walk (default all)")
    parser.add_argument("--sm-count", type=int, default=None,
                        help="SMs of the GPU (sizes the split-KV grid; default: the target's reference "
                             "GPU, " + ", ".join(f"{t.name} {t.sm_count}" for t in TARGETS.values()) + ")")
    parser.add_argument("--context", type=int, default=None,
                        help="keys per sequence in the decode step, for its bytes (default n_positions/2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the result files (default: the folder `gptfast bench` uses without "
                             "--out, ~/.local/share/gptfast/bench)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the JSON here (and the CSV beside it) instead of the results folder")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="compile into an empty Triton cache (a temporary folder), so that the compile "
                             "seconds are cold-cache figures; otherwise Triton's cache may serve variants")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def _problems(report: dict) -> list[str]:
    """What would fail on the GPU or cost a CUDA graph its point: a variant over the shared-memory
    limit, a 16-bit variant that spills, a host sync inside a decode step."""
    out = []
    for v in report["variants"]:
        if v["smem_bytes"] > v["smem_limit"]:
            out.append(f"{v['kernel']} ({v['dtype']}) needs {v['smem_bytes']} B of shared memory, more than "
                       f"{report['target']}'s {v['smem_limit']} B per CTA")
        if v["spill_bytes"] and v["dtype"] != "fp32":
            out.append(f"{v['kernel']} ({v['dtype']}, {v['constexprs']}) spills {v['spill_bytes']} B")
    for s in report["decode_steps"] + report["prefill"]:
        for sync in s["host_syncs"]:
            where = f"bucket {s['bucket']} {s['graph']}" if "bucket" in s else "prefill"
            out.append(f"host sync in the {s['dtype']} {where} step: {sync}")
    return out


def _tables(report: dict) -> str:
    from collections import OrderedDict

    from .results import format_table

    by_key = {(s["dtype"], s["bucket"], s["graph"]): s for s in report["decode_steps"]}
    rows = []
    for (dtype, bucket, graph), s in by_key.items():
        if graph != "sample":
            continue
        greedy = by_key.get((dtype, bucket, "greedy"))
        logits = by_key.get((dtype, bucket, "logits"))
        rows.append({"dtype": dtype, "bucket": bucket, "kernels": s["kernels"], "triton": s["triton"],
                     "other": s["other"], "greedy graph": greedy["kernels"] if greedy else None,
                     "logits graph": logits["kernels"] if logits else None,
                     "MB moved": s["total_bytes"] / 1e6, "% of floor": 100 * s["total_bytes"] / s["weight_bytes"],
                     "host syncs": len(s["host_syncs"])})
    for p in report["prefill"]:
        rows.append({"dtype": p["dtype"], "bucket": f"prefill {p['tokens']}", "kernels": p["kernels"],
                     "triton": p["triton"], "other": p["other"], "greedy graph": None, "logits graph": None,
                     "MB moved": p["total_bytes"] / 1e6, "% of floor": None, "host syncs": len(p["host_syncs"])})
    weights = f" with {report['quantize']} weights" if report["quantize"] else ""
    # what the floor counts: every weight once, a quantised matrix as its int8 copy (`_weight_floor`)
    once = "every weight once; int8: 1 B a weight + fp32 scales" if report["quantize"] else "every weight once"
    parts = [f"Decode steps (the function each CUDA graph captures), {report['model']}{weights}, {report['target']} "
             f"({report['sm_count']} SMs), context {report['context']}.",
             "Kernels of the sample graph (of the greedy and logits graphs apart), the MB the sample graph "
             "moves and their %", f"of the weight-read floor ({once}):", format_table(rows)]
    # by kernel: the first bucket's greedy step where it has one (a greedy generate() at batch 1)
    first = report["decode_steps"][0]
    first = by_key.get((first["dtype"], first["bucket"], "greedy"), first)
    floor = first["weight_bytes"]
    groups: OrderedDict = OrderedDict()
    for name, grid, nbytes in zip(first["names"], first["grids"], first["bytes"]):
        key = (name, "x".join(map(str, grid)) if grid else "-")
        count, total = groups.get(key, (0, 0))
        groups[key] = (count + 1, total + nbytes)
    rows = [{"kernel": name, "grid": grid, "launches": n, "MB moved": total / 1e6, "% of floor": 100 * total / floor}
            for (name, grid), (n, total) in groups.items()]
    parts += ["", f"One {first['dtype']} step at bucket {first['bucket']} ({first['graph']} graph), by kernel: "
                  f"it moves {first['total_bytes'] / 1e6:.1f} MB, {100 * first['total_bytes'] / floor:.1f}% of the",
              f"weight-read floor ({floor / 1e6:.1f} MB, {once}; the % column is each kernel's share):",
              format_table(rows)]
    rows = []
    for v in report["variants"]:
        consts = ",".join(f"{k}={val}" for k, val in v["constexprs"].items())
        name = v["kernel"].strip("_").removesuffix("_kernel")
        rows.append({"kernel": name[:24], "dtype": v["dtype"], "warps": v["num_warps"],
                     "stages": v["num_stages"], "regs": v["registers"], "spill B": v["spill_bytes"],
                     "stack B": v["stack_bytes"], "smem B": v["smem_bytes"], "CTA/SM": v["ctas_per_sm"],
                     "compile s": v["compile_s"], "constexprs": consts[:27] + ("…" if len(consts) > 27 else "")})
    parts += ["", f"Compiled variants ({len(report['variants'])}) for {report['target']}; ptxas -v, "
                  "CTAs per SM from registers, shared memory and warps:", format_table(rows)]
    return "\n".join(parts)


def _dumps(doc: dict) -> str:
    """JSON with one line per top-level key, and per element of a list of records (a decode step,
    a variant): a full sweep's thousands of launches stay a readable, diffable file."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            text = "[\n" + ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value) + "\n ]"
        else:
            text = json.dumps(value, ensure_ascii=False)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _save(report: dict, out_dir: Path | None, json_path: Path | None) -> list[Path]:
    import csv
    import datetime

    from . import default_out_dir
    from . import provenance as _provenance
    from .results import _jsonable

    facts = _provenance.collect(device="cpu")
    doc = {"name": "kernels", "provenance": facts,
           "notes": ["compiled and counted on the CPU: no kernel ran; registers/spills/shared memory are "
                     "ptxas's for the target, bytes are each launch's minimum traffic"], **report}
    if json_path is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out_dir = default_out_dir() if out_dir is None else out_dir
        weights = f"-{report['quantize']}" if report["quantize"] else ""
        json_path = Path(out_dir) / f"kernels-{report['target']}-{report['model']}{weights}-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(_dumps(_jsonable(doc)))
    csv_path = json_path.with_suffix(".csv")
    columns = ["kernel", "dtype", "quantize", "target", "num_warps", "num_stages", "registers", "spill_bytes",
               "stack_bytes", "smem_bytes", "ctas_per_sm", "compile_s", "constexprs", "specialization", "hash"]
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + ["git_commit", "command"])
        for v in report["variants"]:
            writer.writerow([json.dumps(v[c], sort_keys=True) if c == "constexprs" else v[c] for c in columns]
                            + [facts.get("git_commit"), facts.get("command")])
    return [json_path, csv_path]


def run_kernels(args) -> int:
    """`gptfast kernels`: compile, count, print the tables, write the files; exit status 1 when
    `_problems` finds any (listed last) or the tool cannot run here, 2 for an argument it cannot
    take (one `error: ...` line either way)."""
    progress = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    with contextlib.ExitStack() as stack:
        if args.fresh_cache:
            stack.enter_context(_fresh_triton_cache())
        try:
            report = inspect_kernels(args.model, args.dtype, args.target, args.buckets, context=args.context,
                                     sm_count=args.sm_count, quantize=args.quantize, log=progress)
        except ValueError as e:  # an argument it cannot take: a usage error
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:  # it cannot run here (kernels defined for the interpreter, ptxas failed)
            print(f"error: {e}", file=sys.stderr)
            return 1
    report["triton_cache"] = "fresh" if args.fresh_cache else "reused (compile seconds may be cache hits)"
    print(_tables(report))
    paths = _save(report, args.out, args.json)
    print("\nwrote:\n" + "\n".join(f"  {p}" for p in paths))
    problems = _problems(report)
    for line in problems:
        print(f"PROBLEM: {line}")
    return 1 if problems else 0

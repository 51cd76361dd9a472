"""How many GPU kernels one decode step launches, counted with the PyTorch profiler.

Per-layer kernels of GPT-2's decode step are ~1 µs of DRAM time each, about the gap between two
launches inside a CUDA graph: at batch 1 the kernel count per
step bounds the step time as much as the bytes do. `kernels_per_decode_step` builds an `Engine`,
admits `batch_size` requests, runs their prefill and one warm-up decode step (Triton compiles,
graph capture), then profiles exactly one decode step and counts the device kernels it ran
(ProfilerActivity.CUDA: kernels launched one by one, or replayed from a CUDA graph, each appear).
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

__all__ = ["kernels_per_decode_step"]

_PROMPT_LEN = 32
# Host calls that launch work on the GPU, by name prefix (CUDA runtime and driver API names in the
# profile: cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernel(Ex) from Triton, cudaGraphLaunch).
_LAUNCH_CALLS = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")


def profile_one_decode_step(model, batch_size: int, graphs: bool, activities: list) -> tuple[Any, list]:
    """Admit `batch_size` greedy requests, step through their prefill and one warm-up decode step,
    then run exactly one more decode step under `torch.profiler.profile(activities=activities)`.

    Returns (the profiler, the `StepOutput`s of the profiled step). Raises RuntimeError when the
    profiled step is not a decode step of every request.
    """
    import torch

    from gptfast.engine import Engine, SamplingParams

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    gen = torch.Generator().manual_seed(batch_size)
    prompt_len = min(_PROMPT_LEN, model.config.n_positions - 4)
    # NOTE: the default max_num_seqs unless more are asked for: the graph runner is the model's,
    # and a runner built for fewer rows would be rebuilt (recaptured) by the next default engine.
    engine = Engine(model, max_num_seqs=max(batch_size, 256), cuda_graphs=graphs)
    # 4 new tokens: one from the prefill, one warm-up decode step, the profiled step, one more so
    # that the profiled step finishes nothing (a finishing step also frees blocks).
    params = SamplingParams(max_new_tokens=4)
    for i in range(batch_size):
        prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add(prompt, params, seeds=[i])
    produced = collections.Counter()  # tokens per sequence so far
    while len(produced) < batch_size or min(produced.values()) < 2:  # prefill(s), then warm-up decode
        outs = engine.step()
        if not outs:
            raise RuntimeError("the engine stopped producing tokens before the profiled step")
        produced.update(o.seq_id for o in outs)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        outs = engine.step()
        sync()
    if len(outs) != batch_size or any(o.index != 2 for o in outs):
        raise RuntimeError(f"the profiled step was not one decode step of all {batch_size} sequences: "
                           f"it produced {len(outs)} tokens with indices {sorted({o.index for o in outs})}")
    while engine.has_unfinished():  # give the blocks back
        engine.step()
    return prof, outs


def count_device_events(events: Iterable, launch_names: Iterable[str] = _LAUNCH_CALLS, top: int = 15) -> dict:
    """Count the device events of a profile (`prof.events()`): kernels, and copies/memsets apart,
    with the device time of each kernel.

    Returns
    -------
    dict: kernels (int), copies (memcpy + memset events, int), launch_calls (host calls whose name
    starts with one of `launch_names`, int), top (list of (kernel name, count), most frequent
    first, at most `top`), kernel_us (list of (kernel name, device µs), one per kernel, longest
    first), kernel_sum_us (their sum), device_span_us (first kernel start to last kernel end: the
    device time the kernels took with the gaps between them; None without kernels).
    """
    from torch.autograd import DeviceType

    kernels: collections.Counter = collections.Counter()
    copies = launches = 0
    launch_names = tuple(launch_names)
    times, starts, ends = [], [], []
    for e in events:
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(("Memcpy", "Memset", "memcpy", "memset")):
                copies += 1
            else:
                kernels[e.name] += 1
                start, end = e.time_range.start, e.time_range.end  # µs, device clock
                times.append((e.name[:100], end - start))
                starts.append(start)
                ends.append(end)
        elif e.name.startswith(launch_names):
            launches += 1
    times.sort(key=lambda t: -t[1])
    return dict(kernels=sum(kernels.values()), copies=copies, launch_calls=launches,
                top=[(name[:100], n) for name, n in kernels.most_common(top)],
                kernel_us=times, kernel_sum_us=sum(t for _, t in times),
                device_span_us=(max(ends) - min(starts)) if times else None)


def kernels_per_decode_step(model, batch_size: int = 1, graphs: bool = False) -> dict:
    """The GPU kernels one decode step of `model` runs at `batch_size`.

    Parameters
    ----------
    model : gptfast.GPT2
        On a CUDA device.
    batch_size : int
        Sequences in the step (prompts of 32 random tokens, greedy: up to 8 rows the graphs run
        the fused greedy head, the runner's "greedy" graph).
    graphs : bool
        Decode through the model's CUDA graphs (the kernels inside the replayed graph are
        counted, and launch_calls shows the single graph launch) or launch every kernel eagerly
        (False: each launch shows; the default).

    Returns
    -------
    dict with batch_size, graphs, kernels (device kernels in the step), kernels_per_layer
    (kernels / n_layer), copies (memcpy/memset events), launch_calls (host-side launch calls),
    top (the 15 most frequent kernel names with their counts), kernel_us (every kernel's device
    time, longest first), kernel_sum_us, device_span_us (see `count_device_events`).

    Examples
    --------
    >>> model = gptfast.GPT2.from_config("gpt2", seed=0, dtype=torch.bfloat16, device="cuda")
    >>> kernels_per_decode_step(model, batch_size=1)["kernels"]  # doctest: +SKIP
    """
    import torch
    from torch.profiler import ProfilerActivity

    if model.device.type != "cuda":
        raise RuntimeError(f"kernels_per_decode_step counts GPU kernels: the model is on "
                           f"{model.device}, it needs a CUDA device")
    prof, _ = profile_one_decode_step(model, batch_size, graphs,
                                      [ProfilerActivity.CPU, ProfilerActivity.CUDA])
    counts = count_device_events(prof.events())
    if counts["kernels"] == 0:
        raise RuntimeError("the profiler recorded no CUDA kernel in the decode step "
                           f"(torch {torch.__version__}: is CUPTI available?)")
    return dict(batch_size=batch_size, graphs=graphs, kernels_per_layer=counts["kernels"] / model.config.n_layer,
                **counts)

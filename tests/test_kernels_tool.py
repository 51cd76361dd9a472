"""`gptfast kernels`: every Triton variant compiled for sm_90 without a GPU, and the decode step's
kernels counted along the CUDA branches.

The compiling runs go through the command line in a subprocess: this test process defines the
kernels for Triton's interpreter (conftest sets TRITON_INTERPRET=1 before anything imports
triton), and a compiled variant needs them defined for the GPU. One run per test module (the
sampler alone compiles for several seconds per variant); Triton's on-disk cache serves repeats.
"""

import collections
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfast import ops
from gptfast.bench import kernels as K
from gptfast.ops import attn_decode

ROOT = Path(__file__).resolve().parents[1]
CI_BUCKETS = (1, 8, 64, 256)


def _run_tool(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    path = tmp / "kernels.json"
    done = subprocess.run([sys.executable, "-m", "gptfast", "kernels", "--json", str(path), "--no-progress", *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert path.exists(), f"no JSON written (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done, json.loads(path.read_text()), path


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernels")
    return _run_tool(tmp, "--model", "gpt2", "--dtype", "bf16,fp16", "--target", "sm_90",
                     "--buckets", ",".join(map(str, CI_BUCKETS)))


def _step(doc, dtype, bucket, graph="sample"):
    [step] = [s for s in doc["decode_steps"] if (s["dtype"], s["bucket"], s["graph"]) == (dtype, bucket, graph)]
    return step


def _expected_batch1_names(n_layer=12, graph="sample"):
    # The step's kernels at batch 1 (the small-batch GEMV path, 5 per block): LN -> c_attn (block 0
    # gathers the embedding too), split-KV attention with the K/V append, merge -> c_proj +
    # residual, LN -> c_fc + GELU, c_proj + residual; the head (ln_f -> lm_head); around them the
    # device-side step inputs and the sampler split over the row (chunk pass + combine), which
    # writes the static outputs itself. The greedy graph's head is ln_f -> lm_head -> per-CTA
    # argmax (an _ln_linear_kernel variant) and the argmax reduce, with no sampler. At 545453b the
    # step was 113 (62 Triton, 37 aten.linear, 12 aten.mm, aten.to + aten.stack).
    head = ({"_sample_split_kernel": 1, "_sample_kernel": 1} if graph == "sample"
            else {"_argmax_reduce_kernel": 1})
    return collections.Counter({"_decode_inputs_kernel": 1, "_ln_linear_kernel": 2 * n_layer + 1,
                                "_decode_split_kernel": n_layer, "_linear_residual_kernel": 2 * n_layer, **head})


def _graphs(bucket: int) -> tuple[str, ...]:
    """The graphs a bucket has: the fused greedy head in the GEMV regime (up to 8 rows) only."""
    return ("sample", "greedy", "logits") if bucket <= 8 else ("sample", "logits")


def _expected_kernels(bucket: int, graph: str) -> int:
    """gpt2's kernels per decode step by bucket: the GEMV path up to 8 rows (the greedy graph one
    fewer than the sample graph: the argmax reduce instead of the sampler's two launches); above,
    cuBLAS GEMMs with fused epilogues and the add+LN kernels (49 non-Triton ops), the sampler split
    over each row up to 32 rows, one split-KV launch (no merge) from 48 rows on."""
    if bucket <= 8:
        return {"sample": 64, "greedy": 63, "logits": 62}[graph]
    if bucket <= 40:
        return 101 if graph == "sample" and bucket <= 32 else 100
    return 88


def test_tool_exits_cleanly_and_fits_120_columns(ci_run):
    done, _, _ = ci_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wide = [line for line in done.stdout.splitlines() if len(line) > 120]
    assert not wide, f"{len(wide)} lines wider than 120 columns, e.g. {wide[0]!r}"
    assert "PROBLEM" not in done.stdout


def test_step_records_are_consistent(ci_run):
    _, doc, _ = ci_run
    assert {(s["dtype"], s["bucket"], s["graph"]) for s in doc["decode_steps"]} == {
        (d, b, g) for d in ("bf16", "fp16") for b in CI_BUCKETS for g in _graphs(b)}
    for s in doc["decode_steps"] + doc["prefill"]:
        assert s["kernels"] == len(s["names"]) == s["triton"] + s["other"] == len(s["grids"]) == len(s["bytes"])
        assert s["triton"] == sum(1 for g in s["grids"] if g is not None)
        assert all(b >= 0 for b in s["bytes"]) and s["total_bytes"] == sum(s["bytes"])
    assert doc["target"] == "sm_90" and doc["sm_count"] == 132
    assert doc["provenance"]["command"] and "torch" in doc["provenance"]


def test_gpt2_batch1_step_is_64_kernels_and_63_greedy(ci_run):
    """Pinned at <= 64 (<= 5 a block + <= 4 others), 63 for a greedy batch (the fused head); lower
    them with the work that lowers them."""
    _, doc, _ = ci_run
    for dtype in ("bf16", "fp16"):
        step = _step(doc, dtype, 1)
        assert (step["kernels"], step["triton"], step["other"]) == (64, 64, 0)
        assert collections.Counter(step["names"]) == _expected_batch1_names()
        greedy = _step(doc, dtype, 1, "greedy")
        assert (greedy["kernels"], greedy["triton"], greedy["other"]) == (63, 63, 0)
        assert collections.Counter(greedy["names"]) == _expected_batch1_names(graph="greedy")
        assert greedy["names"][-2:] == ["_ln_linear_kernel", "_argmax_reduce_kernel"]  # the step ends in the head
        # the logits graph stops before the sampler (its two kernels)
        assert _step(doc, dtype, 1, "logits")["kernels"] == 62
        for bucket in CI_BUCKETS:
            for graph in _graphs(bucket):
                assert _step(doc, dtype, bucket, graph)["kernels"] == _expected_kernels(bucket, graph), \
                    (dtype, bucket, graph)


def test_sampler_is_spread_over_32_ctas_or_more_at_batch_1(ci_run):
    _, doc, _ = ci_run
    for dtype in ("bf16", "fp16"):
        step = _step(doc, dtype, 1)
        [grid] = [g for n, g in zip(step["names"], step["grids"]) if n == "_sample_split_kernel"]
        assert grid[0] * grid[1] * grid[2] >= 32, grid


def test_bytes_cover_the_weights_once(ci_run):
    # gpt2 in bf16: 124.4M parameters, the tied head read once by the head GEMM (the embedding
    # gathers one row of wte and of wpe), plus the K/V of `context` tokens per layer.
    _, doc, _ = ci_run
    params = 124_439_808 - 1024 * 768  # wpe: one row gathered, like wte's
    kv = doc["context"] * 12 * 2 * 768 * 2
    for graph in ("sample", "greedy"):
        step = _step(doc, "bf16", 1, graph)
        assert step["weight_bytes"] == params * 2  # the weight-read floor the tables divide by
        assert params * 2 + kv <= step["total_bytes"] <= params * 2 + kv + 2_000_000
        attn = [b for n, b in zip(step["names"], step["bytes"]) if n == "_decode_split_kernel"]
        assert min(attn) >= doc["context"] * 2 * 768 * 2  # each layer reads its K and V
    # the greedy head reads the tied head once and writes no logits (the sampler graph writes
    # and reads 50,257 bf16 logits): it moves less
    assert _step(doc, "bf16", 1, "greedy")["total_bytes"] < _step(doc, "bf16", 1)["total_bytes"]


def test_no_host_sync_in_any_step(ci_run):
    _, doc, _ = ci_run
    assert [s["host_syncs"] for s in doc["decode_steps"] + doc["prefill"] if s["host_syncs"]] == []


def test_16bit_variants_compile_without_spills_within_shared_memory(ci_run):
    _, doc, _ = ci_run
    variants = doc["variants"]
    kernels = {v["kernel"] for v in variants}
    # buckets 1 and 8: the GEMV path; 64 and 256: cuBLAS with the fused epilogues; the prefill
    assert {"_decode_inputs_kernel", "_ln_linear_kernel", "_linear_residual_kernel", "_decode_split_kernel",
            "_sample_split_kernel", "_sample_kernel", "_argmax_reduce_kernel", "_embed_layernorm_kernel",
            "_add_layernorm_kernel", "_kv_cache_write_kernel", "_prefill_kernel"} <= kernels
    # the logits rows are padded to 64 elements: Triton specialises the sampler on a row stride
    # divisible by 16 (the loads of a row start aligned and vectorise)
    for v in variants:
        if v["kernel"] in ("_sample_split_kernel", "_sample_kernel"):
            assert "stride_b%16" in v["specialization"].split(), v
    assert {v["dtype"] for v in variants} == {"bf16", "fp16"}
    for v in variants:
        assert v["target"] == "sm_90" and v["registers"] > 0, v
        assert v["spill_bytes"] == 0, f"{v['kernel']} {v['dtype']} {v['constexprs']} spills {v['spill_bytes']} B"
        assert v["smem_bytes"] <= K.TARGETS["sm_90"].smem_per_cta, v
        assert v["ctas_per_sm"] >= 1, v
    # the review's figures at 545453b
    [prefill] = {(v["registers"], v["smem_bytes"]) for v in variants if v["kernel"] == "_prefill_kernel"}
    assert prefill == (248, 49408)
    assert {(v["num_warps"], v["ctas_per_sm"]) for v in variants if v["kernel"] == "_sample_kernel"} == {(16, 1)}


def test_csv_has_one_row_per_variant(ci_run):
    _, doc, path = ci_run
    with path.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["variants"])
    assert [(r["kernel"], r["dtype"], int(r["registers"])) for r in rows] == [
        (v["kernel"], v["dtype"], v["registers"]) for v in doc["variants"]]
    assert all(r["command"] == doc["provenance"]["command"] for r in rows)


# ---------------------------------------------------------------- --quantize int8
INT8_BUCKETS = (1, 8, 64)  # the int8 GEMV's row blocks: 1 row, 8 rows, 8 of 64 rows


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernels_int8")
    return _run_tool(tmp, "--model", "gpt2", "--quantize", "int8", "--dtype", "bf16", "--target", "sm_90",
                     "--buckets", ",".join(map(str, INT8_BUCKETS)))


def _gpt2_int8_floor() -> tuple[int, int, int]:
    """gpt2's weight-read floor with int8 matrices: (int8 weights, scales, other float parameters)
    in bytes. The int8 matrices: per block c_attn (2304 x 768), attn c_proj (768 x 768), c_fc
    (3072 x 768), mlp c_proj (768 x 3072), and the tied head (50257 x 768); one byte a weight
    and a 4-byte scale per output channel. The LayerNorms and biases stay bf16; wte counts as
    the head's int8 copy (the embedding gathers one row), wpe not at all."""
    C, L, V = 768, 12, 50257
    rows = [3 * C, C, 4 * C, C]  # output channels of each block's linears
    weights = L * C * sum([3 * C, C, 4 * C, 4 * C]) + V * C
    scales = 4 * (L * sum(rows) + V)
    others = 2 * (L * (4 * C + sum(rows)) + 2 * C)  # ln_1, ln_2 (weight, bias), biases; ln_f
    return weights, scales, others


def test_int8_step_runs_the_int8_gemv_at_every_bucket(int8_run):
    """Every matmul of an int8 decode step is the int8 GEMV (4 per block and the head) at every
    bucket, between the modules' own ops (LayerNorm, residual adds, GELU) and the paged
    attention kernels: what `GPT2._stages` runs on CUDA for an int8 model, with no greedy graph
    (the fused greedy head is the float GEMV path's) and no host sync."""
    done, doc, _ = int8_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PROBLEM" not in done.stdout and "with int8 weights" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 120
    assert doc["quantize"] == "int8"
    assert {(s["bucket"], s["graph"]) for s in doc["decode_steps"]} == {
        (b, g) for b in INT8_BUCKETS for g in ("sample", "logits")}
    for s in doc["decode_steps"] + doc["prefill"]:
        names = collections.Counter(s["names"])
        assert names["_int8_linear_kernel"] == 4 * 12 + 1, (s.get("bucket"), names)
        assert not {"_ln_linear_kernel", "_linear_residual_kernel", "aten.linear", "aten.mm", "aten.addmm",
                    "aten.scaled_dot_product_attention"} & set(names), (s.get("bucket"), names)
        assert s["host_syncs"] == []
        assert s["kernels"] == len(s["names"]) == s["triton"] + s["other"]
    # batch 1, pinned (153 against the float GEMV path's 64): the device-side step inputs; the
    # wte + wpe gathers and their sum; per block ln_1, c_attn, the K/V write, split-KV attention
    # and its merge, c_proj, the residual add, ln_2, c_fc, GELU, c_proj, the residual add; ln_f,
    # the head; the logits copied into the graph's static buffer; the sampler's two launches
    step = _step(doc, "bf16", 1)
    assert collections.Counter(step["names"]) == collections.Counter({
        "_decode_inputs_kernel": 1, "aten.embedding": 2, "aten.add": 25, "aten.layer_norm": 25,
        "_int8_linear_kernel": 49, "_kv_cache_write_kernel": 12, "_decode_split_kernel": 12,
        "_decode_merge_kernel": 12, "aten.gelu": 12, "aten.copy_": 1, "_sample_split_kernel": 1,
        "_sample_kernel": 1})
    assert _step(doc, "bf16", 1, "logits")["kernels"] == step["kernels"] - 2


def test_int8_bytes_count_one_byte_per_weight(int8_run, ci_run):
    _, doc, _ = int8_run
    weights, scales, others = _gpt2_int8_floor()
    for s in doc["decode_steps"]:
        assert s["weight_bytes"] == weights + scales + others == 124_307_524
    # the float model's floor counts the same matrices at 2 bytes a weight
    assert _step(ci_run[1], "bf16", 1)["weight_bytes"] == 2 * weights + others
    step = _step(doc, "bf16", 1)
    gemv = [b for n, b in zip(step["names"], step["bytes"]) if n == "_int8_linear_kernel"]
    # the head: its int8 copy and scales, one bf16 row of x in, one row of bf16 logits out
    V, C = 50257, 768
    assert gemv[-1] == V * C + 4 * V + 2 * C + 2 * V
    assert weights + scales <= sum(gemv) < weights + scales + 2_000_000
    # the step: the floor and the K/V it attends to, plus ~2.5 MB of activations, attention
    # partials, logits and the sampler's reads (the unfused ops read and write the activations)
    kv = doc["context"] * 12 * 2 * C * 2
    assert weights + scales + others + kv <= step["total_bytes"] <= weights + scales + others + kv + 3_000_000


def test_int8_gemv_compiles_for_sm90_without_spills(int8_run):
    """Every int8 GEMV variant launched (1 and 8 rows a program, with and without the bias)
    compiles for sm_90 with the spill bytes ptxas printed, 0 for the shipped tiles."""
    _, doc, _ = int8_run
    int8 = [v for v in doc["variants"] if v["kernel"] == "_int8_linear_kernel"]
    assert {(v["constexprs"]["BLOCK_M"], v["constexprs"]["HAS_BIAS"]) for v in int8} >= {
        (1, True), (1, False), (8, True), (8, False)}
    for v in doc["variants"]:
        assert v["quantize"] == "int8" and v["target"] == "sm_90"
        # the figures are ptxas's: its resource lines are kept, and the ints are read from them
        stack, stores, loads = map(int, re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", v["ptxas"]).groups())
        assert type(v["spill_bytes"]) is int and v["spill_bytes"] == stores + loads, v
        assert v["stack_bytes"] == stack
        assert v["registers"] == int(re.search(r"Used (\d+) registers", v["ptxas"]).group(1)) > 0
        assert v["spill_bytes"] == 0, f"{v['kernel']} {v['constexprs']} spills: {v['ptxas']}"
        assert v["smem_bytes"] <= K.TARGETS["sm_90"].smem_per_cta and v["ctas_per_sm"] >= 1, v


def test_ptxas_figures_are_read_from_its_log():
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")
    info = K._parse_ptxas(log)
    assert (info["stack_bytes"], info["spill_store_bytes"], info["spill_load_bytes"], info["registers"],
            info["barriers"], info["static_smem_bytes"]) == (24, 16, 12, 255, 1, 1024)
    assert info["ptxas"] == ("24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads; "
                             "Used 255 registers, used 1 barriers, 1024 bytes smem")
    # a log without the spill figures is an error, not 0 spills
    with pytest.raises(RuntimeError, match="spill_store_bytes"):
        K._parse_ptxas(log.replace("16 bytes spill stores", ""))


def test_quantize_mode_is_checked():
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        K.inspect_kernels("gpt2", ["bf16"], buckets=[1], quantize="int4")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "gptfast", "kernels", "--quantize", "int4"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--quantize" in done.stderr and "int8" in done.stderr, done.stderr


def test_int8_results_are_named_apart(tmp_path):
    report = dict(model="gpt2", target="sm_90", quantize="int8", variants=[])
    json_path, csv_path = K._save(report, tmp_path, None)
    assert json_path.name.startswith("kernels-sm_90-gpt2-int8-") and csv_path.exists()


def test_ctas_per_sm_limits():
    sm90 = K.TARGETS["sm_90"]
    assert K.ctas_per_sm(113, 8192, 16, sm90) == 1  # registers: 120 x 32 x 16 = 61,440 of 65,536
    assert K.ctas_per_sm(248, 49408, 4, sm90) == 2  # registers again
    assert K.ctas_per_sm(32, 0, 4, sm90) == 16  # warps: 64 per SM
    assert K.ctas_per_sm(16, 0, 1, sm90) == 32  # the CTA limit
    assert K.ctas_per_sm(32, 100_000, 4, sm90) == 2  # shared memory: 233,472 / 101,024
    assert K.ctas_per_sm(32, 240_000, 4, sm90) == 0  # over the per-CTA maximum: cannot launch
    assert K.ctas_per_sm(32, 100_000, 4, K.TARGETS["sm_89"]) == 1
    with pytest.raises(ValueError, match="num_warps"):
        K.ctas_per_sm(32, 0, 0, sm90)


def test_as_cuda_takes_the_cuda_branches_on_cpu_tensors():
    x = torch.zeros(3)
    assert not ops.use_triton(x)
    with ops.as_cuda(132):
        assert ops.use_triton(x) and ops.on_cuda(x.device)
        assert attn_decode._sm_count(x.device) == 132
    assert not ops.on_cuda(x.device)
    with pytest.raises(ValueError, match="sm_count"):
        with ops.as_cuda(0):
            pass


def _record(fn):
    session = K._Session(K.TARGETS["sm_90"])
    launches, syncs = K._recorded(session, fn)
    return [x.name for x in launches], syncs


def test_host_sync_detector_flags_each_kind():
    x = torch.randn(8)
    mask = x > 0
    _, syncs = _record(lambda: x.sum().item())
    assert len(syncs) == 1 and "aten.item" in syncs[0] and "tests/test_kernels_tool.py:" in syncs[0], syncs
    for fn, op in [(lambda: x.nonzero(), "aten.nonzero"), (lambda: x[mask], "boolean-mask"),
                   (lambda: torch.tensor([1, 2]), "aten.lift_fresh"), (lambda: bool(x.sum()), "aten.is_nonzero"),
                   (lambda: torch.masked_select(x, mask), "aten.masked_select"),
                   (lambda: x.to("cpu", torch.float16), "a copy to the host")]:
        _, syncs = _record(fn)
        assert any(op in s for s in syncs), (op, syncs)
    names, syncs = _record(lambda: (x.index_select(0, torch.arange(3)) * 2, torch.zeros(2).detach_()))
    assert syncs == [] and names == ["aten.arange", "aten.index_select", "aten.mul", "aten.zeros"]


def test_views_are_not_kernels_and_copies_are():
    x = torch.randn(4, 6)
    names, _ = _record(lambda: (x.view(6, 4), x.t(), x[1:], x.unbind(0), x.to(torch.float32), x.reshape(24)))
    assert names == []
    names, _ = _record(lambda: (x.to(torch.float16), x.t().contiguous(), x.t().reshape(24), x + 1))
    assert names == ["aten.to", "aten.contiguous", "aten.reshape", "aten.add"]
    names, _ = _record(lambda: x.clone().t_())
    assert names == ["aten.clone"]


def test_recorded_ops_are_not_computed_but_shaped():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    out = []
    names, _ = _record(lambda: out.append(a @ b))
    assert names == ["aten.matmul"]
    assert out[0].shape == (3, 7) and out[0].dtype == a.dtype
    assert not torch.allclose(out[0], a @ b)  # allocated, never computed


def test_tool_refuses_interpreter_kernels():
    # this process defined the kernels for the interpreter (conftest): they cannot be compiled
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("kernels are defined for the GPU in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.inspect_kernels("gpt2", ["bf16"], buckets=[1])


@pytest.mark.slow
def test_full_sweep_every_bucket(tmp_path):
    """Every bucket of a 256-row runner, bf16 and fp16: the counts per bucket range, no spills."""
    done, doc, _ = _run_tool(tmp_path, "--dtype", "bf16,fp16")
    assert done.returncode == 0, done.stdout[-3000:]
    from gptfast.graphs import MAX_BATCH, buckets_up_to

    for s in doc["decode_steps"]:
        want = _expected_kernels(s["bucket"], s["graph"])
        assert s["kernels"] == want, (s["dtype"], s["bucket"], s["graph"], s["kernels"])
    assert sorted({s["bucket"] for s in doc["decode_steps"]}) == buckets_up_to(MAX_BATCH)
    assert all(v["spill_bytes"] == 0 for v in doc["variants"])


@pytest.mark.gpu
def test_count_matches_the_profiled_graph_replay():
    """On a GPU: the tool's Triton launches of the batch-1 greedy step (the profiled requests are
    greedy: the fused-head graph) are the kernels the profiler sees in one replay of the decode
    graph, and the other kernels are at least the tool's count (cuBLAS may add a split-K reduce or
    a bias copy to a GEMM)."""
    from torch.profiler import ProfilerActivity

    from gptfast.bench.kernel_count import profile_one_decode_step
    from gptfast.model import GPT2

    report = K.inspect_kernels("gpt2", ["bf16"], buckets=[1], prefill_lens=[16],
                               sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    step = _step(report, "bf16", 1, "greedy")
    model = GPT2.from_config("gpt2", seed=0, dtype=torch.bfloat16, device="cuda")
    prof, _ = profile_one_decode_step(model, 1, True, [ProfilerActivity.CUDA])
    from torch.autograd import DeviceType

    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA
               and not e.name.lower().startswith(("memcpy", "memset"))]
    triton_names = {n for n in step["names"] if not n.startswith("aten.")}
    seen = collections.Counter(k for k in kernels if k in triton_names)
    assert seen == collections.Counter(n for n in step["names"] if n in triton_names), (seen, kernels)
    others = len(kernels) - sum(seen.values())
    assert others >= step["other"], f"profiler: {others} non-Triton kernels, tool {step['other']}: {kernels}"

"""The benchmark runner (gptfast/bench): correctness before timing, result files, table, compare."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from gptfast import get_config
from gptfast.bench import add_bench_arguments, e2e, provenance, results, run_bench, runner
from gptfast.bench.ceilings import Ceilings
from gptfast.bench.op_cases import BenchCase


class SpyTimer:
    """A timer that runs `fn` once and returns scripted µs; records which op ran while timing."""

    def __init__(self, times_us):
        self.times_us = list(times_us)
        self.calls = 0
        self.timing = False

    def __call__(self, fn):
        self.timing = True
        try:
            fn()
        finally:
            self.timing = False
        self.calls += 1
        return self.times_us[(self.calls - 1) % len(self.times_us)]


def fake_op_module(timer: SpyTimer, log: list) -> types.ModuleType:
    """Ops `double` (fast right), `wrong` (fast off by one), `fill` (writes into its argument)."""
    mod = types.ModuleType("fakeops.fake")

    def record(name):
        log.append((name, timer.timing))

    def double(x):
        record("double")
        return x * 2

    def double_ref(x):
        record("double_ref")
        return x + x

    def wrong(x):
        record("wrong")
        return x * 2 + 1

    def wrong_ref(x):
        record("wrong_ref")
        return x * 2

    def fill(x, out):
        record("fill")
        out.copy_(x + 1)

    def fill_ref(x, out):
        record("fill_ref")
        out.copy_(x)
        out.add_(1)

    def make_args():
        return (torch.randn(1000),)

    def make_fill_args():
        return (torch.randn(64), torch.full((64,), float("nan")))

    def benchmark_cases(device, quick):
        return [
            BenchCase("double", "n=1000", make_args, bytes_moved=8000, flops=1000,
                      baselines={"torch_mul": lambda x: torch.mul(x, 2)}),
            BenchCase("wrong", "n=1000", make_args, bytes_moved=8000),
            BenchCase("fill", "n=64", make_fill_args, bytes_moved=512),
        ]

    for fn in (double, double_ref, wrong, wrong_ref, fill, fill_ref, benchmark_cases):
        setattr(mod, fn.__name__, fn)
    return mod


CEILINGS = Ceilings(device="cpu", copy_gbps=1.0, matmul_tflops=1.0, matmul_dtype="float32",
                    copy_bytes=1 << 20, matmul_n=64)


@pytest.fixture
def ops_rows(monkeypatch):
    monkeypatch.setattr(runner, "fast_mode", lambda device: "timed")
    # per case: fast, eager, each baseline, fast again
    timer = SpyTimer([5.0, 10.0, 20.0, 5.5, 4.0, 8.0, 4.0])
    log: list = []
    module = fake_op_module(timer, log)
    rows = runner.run_ops("cpu", quick=True, ceilings=CEILINGS, timer=timer,
                          modules=[("fakeops.fake", module)], progress=False)
    return {r["op"]: r for r in rows}, timer, log


def test_wrong_fast_path_fails_and_is_never_timed(ops_rows):
    rows, timer, log = ops_rows
    row = rows["wrong"]
    assert row["status"] == "FAIL"
    assert "differ" in row["report"] and "max abs err" in row["report"]
    assert row.get("fast_us") is None and row.get("eager_us") is None
    # ran once each for the check, never under the timer
    assert ("wrong", False) in log and ("wrong_ref", False) in log
    assert not any(name.startswith("wrong") and timing for name, timing in log)
    # the two passing cases were timed: 4 calls (fast, eager, baseline, fast) + 3 (no baseline)
    assert timer.calls == 7


def test_correct_fast_path_is_timed_in_roofline_units(ops_rows):
    rows, _, log = ops_rows
    row = rows["double"]
    assert row["status"] == "PASS", row.get("report")
    assert row["fast_us"] == 5.0 and row["eager_us"] == 10.0 and row["torch_mul_us"] == 20.0
    assert row["gbps"] == pytest.approx(8000 / 5e-6 / 1e9)
    assert row["tflops"] == pytest.approx(1000 / 5e-6 / 1e12)
    assert row["speedup_eager"] == pytest.approx(2.0)
    assert row["speedup_torch_mul"] == pytest.approx(4.0)
    assert "torch_mul 4.00×" in row["speedup_baselines"]
    assert row["noise_pct"] == pytest.approx(10.0)
    # floor: 8000 B at 1 GB/s = 8 µs (memory) > 1000 FLOP at 1 TFLOP/s
    assert row["bound"] == "memory" and row["pct_floor"] == pytest.approx(8.0 / 5.0 * 100)
    assert row["primary"] == "fast_us" and row["key"] == "double | n=1000"
    assert ("double", True) in log and ("double_ref", True) in log


def test_op_writing_into_its_arguments_is_compared_on_those(ops_rows):
    rows, _, _ = ops_rows
    assert rows["fill"]["status"] == "PASS", rows["fill"].get("report")
    assert rows["fill"]["fast_us"] == 4.0


def test_without_cuda_or_interpreter_only_the_reference_is_timed(monkeypatch):
    monkeypatch.setattr(runner, "fast_mode", lambda device: "n/a (no CUDA)")
    timer = SpyTimer([3.0])
    log: list = []
    rows = runner.run_ops("cpu", quick=True, timer=timer, modules=[("fakeops.fake", fake_op_module(timer, log))],
                          ops=["wrong"], progress=False)
    assert [r["status"] for r in rows] == ["ref only"]
    assert rows[0]["fast_us"] is None and rows[0]["eager_us"] == 3.0
    assert not any(name == "wrong" for name, _ in log)


def test_discovery_finds_new_op_files_and_reports_broken_ones(tmp_path, monkeypatch):
    pkg = tmp_path / "myops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text("raise AssertionError('common is not an op module')\n")
    (pkg / "scale.py").write_text(textwrap.dedent("""
        def benchmark_cases(device, quick):
            return []
    """))
    (pkg / "helpers.py").write_text("X = 1\n")  # no benchmark_cases: not an op module
    (pkg / "broken.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = dict(runner.discover("myops"))
    assert set(found) == {"myops.scale", "myops.broken"}
    assert isinstance(found["myops.broken"], ImportError)
    rows = runner.run_ops("cpu", True, timer=SpyTimer([1.0]), modules=list(found.items()), progress=False)
    assert [(r["op"], r["status"]) for r in rows] == [("broken", "ERROR")]


def test_discovery_sees_the_real_ops():
    names = [name for name, _ in runner.discover()]
    assert "gptfast.bench.op_cases.attention" in names


def test_results_files_carry_provenance(tmp_path):
    rows = [dict(key="a", op="double", fast_us=1.5, note=None), dict(key="b", op="triple", fast_us=2.25)]
    paths = results.save("ops", rows, tmp_path, columns=["op", "fast_us"], notes=["random weights"])
    assert set(paths) == {"json", "csv", "md"}
    for path in paths.values():
        assert re.fullmatch(r"ops-[a-z0-9-]+-\d{8}-\d{6}\.(json|csv|md)", path.name), path.name
        assert path.parent == tmp_path
    doc = json.loads(paths["json"].read_text())
    assert set(provenance.KEYS) <= set(doc["provenance"])
    assert doc["provenance"]["date_utc"].endswith("+00:00")
    assert doc["rows"][1]["fast_us"] == 2.25 and doc["notes"] == ["random weights"]
    assert paths["csv"].read_text().splitlines()[0] == "op,fast_us"
    md = paths["md"].read_text()
    assert "random weights" in md and "| double | 1.50 |" in md


def test_provenance_has_no_host_name():
    import socket

    facts = provenance.collect("cmd --x", device="cpu")
    assert facts["command"] == "cmd --x" and facts["device_kind"] == "cpu"
    version = torch.__version__.split("+")[0]
    assert facts["torch"] == version or facts["torch"].startswith(version)
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(facts)


def test_table_is_aligned():
    rows = [dict(op="decode_attention", fast_us=12.3456, status="PASS"),
            dict(op="sample", fast_us=1234.5, status="FAIL"),
            dict(op="x", fast_us=None, status="ERROR")]
    lines = results.format_table(rows, ["op", "fast_us", "status"]).splitlines()
    assert lines[0].split() == ["op", "fast", "µs", "check"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    # numbers right-aligned: they end in the same column
    ends = {line.index(v) + len(v) for line, v in zip(lines[2:], ["12.3", "1,234", "-"])}
    assert len(ends) == 1
    assert lines[2].startswith("decode_attention  ") and lines[3].startswith("sample            ")


def test_format_value():
    assert results.format_value(None) == "-"
    assert results.format_value(0.01234) == "0.0123"
    assert results.format_value(3.14159) == "3.14"
    assert results.format_value(31.4159) == "31.4"
    assert results.format_value(31415.9) == "31,416"


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_compare_flags_a_regression(tmp_path, capsys):
    old = [dict(key="op | small", fast_us=10.0, primary="fast_us"),
           dict(key="e2e | gptfast", tok_s=100.0, primary="tok_s", higher_is_better=True),
           dict(key="gone", fast_us=1.0, primary="fast_us")]
    new = [dict(key="op | small", fast_us=12.0, primary="fast_us"),  # 20% slower
           dict(key="e2e | gptfast", tok_s=101.0, primary="tok_s", higher_is_better=True)]
    a = results.save("old", old, tmp_path / "a", formats=["json"])["json"]
    b = results.save("new", new, tmp_path / "b", formats=["json"])["json"]
    verdicts = {r["key"]: r["verdict"] for r in results.compare_rows(old, new)}
    assert verdicts == {"op | small": "REGRESSION", "e2e | gptfast": "same", "gone": "missing in new"}
    assert run_bench(_parse(["--compare", str(a), str(b)])) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "0.833×" in out and "1 regression(s)" in out
    assert run_bench(_parse(["--compare", str(b), str(b)])) == 0
    assert run_bench(_parse(["--compare", str(a), str(tmp_path / "missing.json")])) == 2


@pytest.mark.parametrize("triton_first", [False, True], ids=["command", "triton-imported-first"])
def test_ops_suite_on_the_cpu_never_restarts_the_process(tmp_path, triton_first):
    """The bench picks Triton's interpreter in-process, before anything imports triton, so the
    kernels are checked; a program that imported triton first gets the references only and a note
    saying why. Either way the process runs once (a restart would print its first line twice)."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    code = ("print('PROCESS-START', flush=True); import os, sys; " + ("import triton; " if triton_first else "")
            + "from gptfast.bench import main; rc = main(sys.argv[1:]); "
            "print('TRITON_INTERPRET', os.environ.get('TRITON_INTERPRET')); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "--suite", "ops", "--quick", "--device", "cpu", "--ops",
                           "add_layernorm", "--no-progress", "--no-plots", "--formats", "json", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("PROCESS-START") == 1 and "restart" not in done.stdout
    [path] = tmp_path.glob("ops-*.json")
    statuses = {r["status"] for r in json.loads(path.read_text())["rows"]}
    if triton_first:
        assert statuses == {"ref only"} and "Triton was imported before the bench started" in done.stdout
        assert "TRITON_INTERPRET None" in done.stdout
    else:
        assert statuses == {"PASS"} and "TRITON_INTERPRET 1" in done.stdout


def test_bench_help_imports_nothing_heavy():
    code = textwrap.dedent("""
        import argparse, sys
        import gptfast
        before = set(sys.modules)
        import gptfast.bench
        parser = argparse.ArgumentParser(prog="gptfast bench")
        gptfast.bench.add_bench_arguments(parser)
        parser.parse_args(["--suite", "ops", "--quick"])
        print(" ".join(sorted(m for m in set(sys.modules) - before if "." not in m)))
        print("matplotlib" in sys.modules, "transformers" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added, heavy = done.stdout.splitlines()
    for name in ("torch", "triton", "matplotlib", "transformers", "tqdm"):
        assert name not in added.split(), added
    assert heavy == "False False"


def test_plot_is_drawn(tmp_path):
    rows = [dict(op="decode", bytes_moved=b, eager_us=10.0, fast_us=5.0, speedup_eager=2.0 + i,
                 speedup_sdpa=1.0 + i, pct_floor=40.0 + i, timed="triton")
            for i, b in enumerate((1 << 20, 1 << 24, 1 << 28))]
    rows.append(dict(op="sample", bytes_moved=1 << 20, eager_us=3.0, pct_floor=5.0, timed="eager"))
    path = __import__("gptfast.bench.plots", fromlist=["plot_ops"]).plot_ops(rows, tmp_path / "p.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streamer_skips_the_prompt_and_stamps_each_token():
    s = e2e.TimingStreamer(prompt_len=5)
    s.put(torch.arange(5)[None])
    for t in range(3):
        s.put(torch.tensor([t]))
    s.end()
    assert len(s.times) == 3 and s.times == sorted(s.times) and s.ended >= s.times[-1]
    assert e2e._percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_padded_batches_fit_the_context():
    requests = [(120, 32), (5, 32), (60, 10)]
    batches = e2e.padded_batches(requests, batch_size=2, vocab=100, n_positions=128, seed=0)
    served = e2e.served_requests(requests, batch_size=2, vocab=100, n_positions=128, seed=0)
    assert [(len(p), n) for p, n in served] == [(120, 8), (5, 8), (60, 10)]  # request order, cut like the batches
    assert sum(n for _, n in served) == sum(b[3] for b in batches)
    for ids, mask, new, _useful in batches:
        assert ids.shape[1] + new <= 128
        assert torch.equal(mask.sum(1) > 0, torch.ones(ids.shape[0], dtype=torch.bool))
        assert (ids[mask == 0] == e2e.PAD_ID).all()
    assert [b[2] for b in batches] == [8, 10]  # the 120-token prompt leaves room for 8
    assert batches[0][3] == 16 and batches[1][3] == 10


def _gptfast_off_by_one(monkeypatch):
    """Make the e2e suite's gptfast return a wrong last token in every row."""
    GPT2, generate = e2e._gptfast_api()

    def off_by_one(model, input_ids=None, **kwargs):
        out = generate(model, input_ids=input_ids, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % model.config.vocab_size
        return out

    monkeypatch.setattr(e2e, "_gptfast_api", lambda: (GPT2, off_by_one))


def _no_timing(monkeypatch):
    for name in ("_batch1", "_mixed", "_continuous"):
        monkeypatch.setattr(e2e, name, lambda *a, **k: pytest.fail("timed after a failed check"))


def test_e2e_mismatch_is_reported_and_not_timed(monkeypatch):
    _gptfast_off_by_one(monkeypatch)
    _no_timing(monkeypatch)
    rows, notes = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None)
    assert len(rows) == 1 and rows[0]["status"] == "FAIL"
    assert "tokens differ" in rows[0]["note"] and "RANDOMLY INITIALISED" in notes[0]


def test_e2e_near_tie_is_noted_and_timed(monkeypatch):
    _gptfast_off_by_one(monkeypatch)
    monkeypatch.setattr(e2e, "TIE_TOL", 1e9)  # every logit gap counts as a tie
    timed = []

    def stub(entrants, *args, **kwargs):
        timed.append(1)
        return {name: RuntimeError("not timed in this test") for name in entrants}

    monkeypatch.setattr(e2e, "_batch1", stub)
    monkeypatch.setattr(e2e, "_mixed", stub)
    monkeypatch.setattr(e2e, "_continuous", lambda *a, **k: timed.append(1) or {}[0])  # raises KeyError
    rows, notes = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None)
    assert timed == [1, 1, 1], "a near-tie must not stop the timing"
    assert any("near-tie" in n for n in notes)
    assert not any(r["status"] == "FAIL" for r in rows)
    continuous = [r for r in rows if "continuous" in r["scenario"]]
    assert [r["status"] for r in continuous] == ["ERROR"] and "KeyError" in continuous[0]["note"]


def test_e2e_engine_api_mismatch_fails_the_check(monkeypatch):
    """The continuous-batching path is checked against HF in fp32 like generate() is."""
    real = e2e.serve_continuous

    def one_wrong_token(model, requests, device):
        out = real(model, requests, device)
        out["tokens"][-1][-1] = (out["tokens"][-1][-1] + 1) % model.config.vocab_size
        return out

    monkeypatch.setattr(e2e, "serve_continuous", one_wrong_token)
    _no_timing(monkeypatch)
    rows, _ = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None)
    assert [r["status"] for r in rows] == ["FAIL"]
    assert "through the Engine API" in rows[0]["note"] and "1 tokens differ" in rows[0]["note"]
    assert rows[0]["key"].startswith("tiny | ")


@pytest.mark.slow
def test_e2e_tiny_runs_and_matches_hf():
    rows, notes = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", ceilings=CEILINGS, progress=False,
                              log=lambda s: None)
    by = {(r["scenario"].split(",")[-1].strip() if r["scenario"].startswith("mixed") else "batch 1", r["engine"]): r
          for r in rows}
    assert all(r["model"] == "tiny" and r["key"].startswith("tiny | ") for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    fast = by[("batch 1", "gptfast")]
    assert fast["status"] == "PASS" and fast["tok_s"] > 0 and fast["ttft_ms"] > 0
    assert fast["itl_p99_ms"] >= fast["itl_p50_ms"] > 0 and fast["pct_bw"] > 0 and fast["speedup_hf"] > 0
    padded = by[("padded batches of 8", "gptfast")]
    assert padded["tok_s"] > 0 and by[("padded batches of 8", e2e.HF_EAGER)]["status"] == "ref"
    cont = by[("continuous batching", "gptfast")]
    plan = e2e.make_plan("cpu", True, get_config("tiny").n_positions)
    # the same useful tokens as the padded batches (outputs cut where a padded batch cuts them)
    padded_useful = sum(b[3] for b in e2e.padded_batches(plan.requests, plan.batch_size, 1000,
                                                        get_config("tiny").n_positions, 0))
    assert cont["status"] == "PASS" and cont["useful_tokens"] == padded_useful
    assert cont["tok_s"] > 0 and cont["ttft_p99_ms"] >= cont["ttft_ms"] > 0
    assert cont["itl_p99_ms"] >= cont["itl_p50_ms"] > 0 and cont["speedup_hf"] > 0
    assert cont["speedup_hf"] == pytest.approx(cont["tok_s"] / by[("padded batches of 8", e2e.HF_EAGER)]["tok_s"])
    # on the CPU: no compiled engines and no reference-ops engine (that is gptfast itself there)
    engines = {r["engine"] for r in rows}
    # in fp32 on the CPU: gptfast int8, and CTranslate2 at both precisions when it is installed
    ct2 = importlib.util.find_spec("ctranslate2") is not None
    contenders = {e2e.GPTFAST_INT8} | ({e2e.CT2_FP32, e2e.CT2_INT8} if ct2 else set())
    assert engines == {e2e.HF_EAGER, e2e.GPTFAST, *e2e.VARIANTS} | contenders
    assert by[("batch 1", e2e.GPTFAST_INT8)]["dtype"] == "int8"
    assert ("speedup_ct2" in fast) == ct2 and any("CTranslate2" in n for n in notes)
    # the argument variants: batch 1 only, timed, their path named
    for name, (_, path) in e2e.VARIANTS.items():
        [v] = [r for r in rows if r["engine"] == name]
        assert v["scenario"].startswith("batch 1") and v["status"] == "timed"
        assert v["note"] == "CPU: every step eager (no graphs)" and path.startswith(("sampled", "graph"))
        assert v["tok_s"] > 0 and v["speedup_hf"] > 0
    assert any("torch.compile skipped on the CPU" in n for n in notes)
    assert any("weights read per decode step" in n for n in notes)
    assert not any("kernels/decode step" in n or "kernel count" in n for n in notes)  # CUDA only
    # the fused decode step against the unfused one: CUDA only, said so
    assert any(n.startswith("the fused decode step") and "skipped on the CPU" in n for n in notes)
    assert e2e.GPTFAST_UNFUSED not in engines and not any(r["scenario"].startswith("decode path") for r in rows)


def test_e2e_compiled_reference_rows(monkeypatch):
    """The CUDA-only batch-1 engines, on the CPU: HF static cache and the static-cache eager
    reference (here uncompiled: the compiled one is tests/test_static_ref.py's job)."""
    from gptfast.bench.static_ref import StaticCacheGenerator

    real_plan = e2e.make_plan

    def plan_with_compiled_refs(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan.compile_refs = True
        return plan

    def eager_static(model, max_len):
        gens = {}

        def generate(ids, mask, new, streamer=None):
            gen = gens.setdefault("g", StaticCacheGenerator(model, batch_size=1, max_len=max_len))
            return gen.generate(ids, new, streamer=streamer)

        return generate

    resets = []
    monkeypatch.setattr(e2e, "make_plan", plan_with_compiled_refs)
    monkeypatch.setattr(e2e, "_static_compiled", eager_static)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    rows, _ = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", ceilings=CEILINGS, progress=False,
                          log=lambda s: None)
    contenders = {e2e.GPTFAST_INT8, e2e.CT2_FP32, e2e.CT2_INT8}  # the CPU fp32 run's (test above)
    rows = [r for r in rows if r["engine"] not in contenders]
    batch1 = {r["engine"]: r for r in rows if r["scenario"].startswith("batch 1")}
    assert list(batch1) == [e2e.HF_EAGER, e2e.HF_STATIC, e2e.REF_COMPILE, e2e.GPTFAST, *e2e.VARIANTS]
    ref = batch1[e2e.REF_COMPILE]
    assert ref["status"] == "ref", ref.get("note")
    assert ref["tok_s"] > 0 and ref["weight_gbps"] > 0 and ref["pct_bw"] > 0 and ref["speedup_hf"] > 0
    assert ref["note"].startswith("greedy: first 8/8 tokens = HF fp32, 16/16 = HF fp32"), ref["note"]
    fast = batch1[e2e.GPTFAST]
    assert fast["speedup_compile"] == pytest.approx(fast["tok_s"] / ref["tok_s"])
    assert f"x {e2e.REF_COMPILE}" in fast["note"]
    assert batch1[e2e.HF_STATIC]["status"] == "ref"
    mixed = {r["engine"] for r in rows if r["scenario"].startswith("mixed")}
    assert mixed == {e2e.HF_EAGER, e2e.GPTFAST}  # static caches are timed at batch 1 only
    assert resets == [1]


def test_cuda_step_facts_wiring(monkeypatch):
    """`cuda_step_facts` on a CPU model, the kernel count faked: what goes into rows and notes."""
    import gptfast
    from gptfast.bench import kernel_count

    model = gptfast.GPT2.from_config("tiny", seed=0)
    calls = []

    def fake_count(m, batch_size, graphs):
        calls.append((batch_size, graphs))
        return dict(batch_size=batch_size, graphs=graphs, kernels=40 if not graphs else 39,
                    kernels_per_layer=20.0 if not graphs else 19.5, copies=2, launch_calls=41 if not graphs else 1,
                    top=[("gemv_kernel", 9), ("layer_norm", 5)],
                    kernel_us=[("gemv_kernel", 5.0), ("layer_norm", 1.5)], kernel_sum_us=6.5, device_span_us=9.0)

    monkeypatch.setattr(kernel_count, "kernels_per_decode_step", fake_count)
    fields, notes = e2e.cuda_step_facts(model, e2e.Options(cuda_graphs=True))
    assert calls == [(1, False), (1, True)]
    # the headline is what the graph replays; the eager count beside it
    assert fields["kernels_per_step"] == 39 and fields["kernels_per_step_eager"] == 40
    assert fields["launch_calls_per_step_graphs"] == 1
    assert fields["replay_kernel_us"] == [("gemv_kernel", 5.0), ("layer_norm", 1.5)]
    assert (fields["replay_kernel_sum_us"], fields["replay_span_us"]) == (6.5, 9.0)
    assert fields["graph_capture_s"] == 0.0  # the CPU runner captures nothing
    assert any(n.startswith("CUDA graphs captured on first use: none, in 0.00 s") for n in notes), notes
    assert any("eager" in n and "40 kernels" in n and "gemv_kernel ×9" in n for n in notes), notes
    assert any("through the CUDA graph: 39 kernels (19.5 per layer of 2) from 1 host launch calls" in n
               and "6.5 µs of a 9.0 µs replay" in n and "gemv_kernel 5.0" in n for n in notes), notes

    calls.clear()
    monkeypatch.setattr(kernel_count, "kernels_per_decode_step",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no CUPTI")))
    fields, notes = e2e.cuda_step_facts(model, e2e.Options(cuda_graphs=False))
    assert fields == {}
    assert notes == ["CUDA graphs off (GPTFAST_CUDA_GRAPHS=0 or cuda_graphs=False): no capture time",
                     "kernel count failed: RuntimeError: no CUPTI"]


def test_graphs_follow_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv("GPTFAST_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("GPTFAST_KERNELS", raising=False)
    assert e2e.graphs_replayed(e2e.Options()) is True  # on by default on CUDA
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "0")
    assert e2e.graphs_replayed(e2e.Options()) is False
    assert e2e.graphs_replayed(e2e.Options(cuda_graphs=True)) is True  # an explicit option wins
    monkeypatch.delenv("GPTFAST_CUDA_GRAPHS")
    assert e2e.graphs_replayed(e2e.Options(kernels="reference")) is False  # the engine's own rule


def test_plans():
    cuda = e2e.make_plan("cuda", quick=False, n_positions=1024)
    assert len(cuda.requests) == 256 and cuda.batch_size == 64 and cuda.compile_refs
    assert all(16 <= p <= 512 and 16 <= o <= 256 for p, o in cuda.requests)
    assert (cuda.prompt_len, cuda.new_tokens) == (128, 256)
    quick = e2e.make_plan("cuda", quick=True, n_positions=1024)
    assert len(quick.requests) == 64 and not quick.compile_refs and any("--quick" in n for n in quick.notes)
    cpu = e2e.make_plan("cpu", quick=True, n_positions=1024)
    assert len(cpu.requests) == 8 and not cpu.compile_refs
    assert sorted(o for _, o in cpu.requests) == [8, 11, 15, 18, 22, 25, 29, 32]  # mixed outputs
    clipped = e2e.make_plan("cpu", quick=True, n_positions=128)
    assert all(p + o <= 128 for p, o in clipped.requests) and (120, 8) in clipped.requests


def test_serve_continuous_gives_each_request_its_own_tokens():
    import gptfast

    from checkpoints import make_hf_model

    model = gptfast.GPT2.from_pretrained(make_hf_model(gptfast.get_config("tiny-odd"), seed=5))
    gen = torch.Generator().manual_seed(5)
    shape = [(1, 4), (7, 1), (30, 12), (50, 3), (13, 9)]  # (prompt, new tokens)
    requests = [(torch.randint(0, 997, (p,), generator=gen).tolist(), n) for p, n in shape]
    got = e2e.serve_continuous(model, requests, "cpu")
    for (prompt, n), tokens in zip(requests, got["tokens"]):
        alone = gptfast.generate(model, input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert tokens == alone
    assert len(got["ttft_s"]) == len(shape) and all(0 < t <= got["seconds"] for t in got["ttft_s"])
    assert len(got["gaps_s"]) == sum(n - 1 for _, n in shape) and min(got["gaps_s"]) > 0
    assert got["steps"] == max(n for _, n in shape) and got["preemptions"] == 0  # one prefill, then decodes


def test_runtime_options_are_keywords_not_environment_variables(monkeypatch):
    """gptfast's contenders get their options as keywords of `generate` (only the options set),
    the environment untouched; the reference-ops contender runs every op eagerly, no graphs."""
    monkeypatch.delenv("GPTFAST_KERNELS", raising=False)
    monkeypatch.setenv("GPTFAST_CUDA_GRAPHS", "1")
    seen, resets = [], []

    class FakeCache:
        def reset_prefix_cache(self):
            resets.append(len(seen))

    class FakeModel:
        kv_cache = FakeCache()

    def fake_generate(model, **kwargs):
        seen.append({k: kwargs[k] for k in ("kernels", "cuda_graphs", "gemv_decode", "do_sample") if k in kwargs})
        return kwargs["input_ids"]

    assert e2e.runtime_keywords(e2e.Options()) == {}
    assert e2e.runtime_keywords(e2e.Options(kernels="triton", gemv_decode=False)) == dict(kernels="triton",
                                                                                          gemv_decode=False)
    ids = torch.tensor([[1, 2]])
    for name in (e2e.REF_OPS, e2e.GPTFAST, e2e.GPTFAST_UNFUSED):
        generate = e2e._gptfast_generate(fake_generate, FakeModel(), "cpu", e2e.BY_NAME[name].options)
        generate(ids, torch.ones_like(ids), 3)
    assert seen == [dict(kernels="reference", cuda_graphs=False, do_sample=False), dict(do_sample=False),
                    dict(gemv_decode=False, do_sample=False)]
    assert resets == [0, 1, 2]  # the prefix cache is dropped before every gptfast run
    assert "GPTFAST_KERNELS" not in os.environ and os.environ["GPTFAST_CUDA_GRAPHS"] == "1"
    # CUDA only: on the CPU gptfast's eager path is gptfast itself, and there is no fused step
    cpu = types.SimpleNamespace(device="cpu", generate=fake_generate, gpt=FakeModel())
    cuda = types.SimpleNamespace(device="cuda", generate=fake_generate, gpt=FakeModel())
    for name in (e2e.REF_OPS, e2e.GPTFAST_UNFUSED):
        contender = e2e.BY_NAME[name]
        assert contender.build(cpu, contender) is None and callable(contender.build(cuda, contender))


def test_compiled_reference_is_built_once_in_reduce_overhead_mode(monkeypatch):
    from gptfast.bench import static_ref

    built = []

    class FakeGenerator:
        def __init__(self, model, batch_size, max_len, compile, mode):
            built.append(dict(model=model, batch_size=batch_size, max_len=max_len, compile=compile, mode=mode))

        def generate(self, ids, new, streamer=None):
            return torch.cat([ids, ids[:, -1:].repeat(1, new)], dim=1)

    monkeypatch.setattr(static_ref, "StaticCacheGenerator", FakeGenerator)
    plan = types.SimpleNamespace(compile_refs=True, prompt_len=40, new_tokens=8)
    contender = e2e.BY_NAME[e2e.REF_COMPILE]
    generate = contender.build(types.SimpleNamespace(plan=plan, gpt="model"), contender)
    assert contender.build(types.SimpleNamespace(plan=types.SimpleNamespace(compile_refs=False)), contender) is None
    assert {c.name for c in e2e.CONTENDERS if c.batch1_only} == {e2e.HF_STATIC, e2e.REF_COMPILE, *e2e.VARIANTS}
    ids = torch.tensor([[4, 5, 6]])
    for _ in range(2):
        assert generate(ids, torch.ones_like(ids), 2).tolist() == [[4, 5, 6, 6, 6]]
    assert built == [dict(model="model", batch_size=1, max_len=48, compile=True, mode="reduce-overhead")]
    with pytest.raises(ValueError, match="without padding"):
        generate(ids, torch.tensor([[0, 1, 1]]), 2)


def _fake_run(device="cpu", dtype="fp32"):
    """A `Run` for the row builder: the tiny preset's sizes, nothing loaded."""
    config = get_config("tiny")
    plan = e2e.make_plan(device, True, config.n_positions)
    return e2e.Run(model="tiny", device=device, dtype=dtype, plan=plan, config=config, hf=None, hf32=None,
                   gpt=None, generate=None, prompt=None, batches=[], requests=[], reference_tokens=None,
                   ceilings=CEILINGS, notes=[])


def test_one_row_builder_for_every_scenario():
    """Rows, statuses, bandwidth and every comparison come from `build_rows`, whatever was measured
    so far (a partial run's rows carry `speedup_ct2` too)."""
    run = _fake_run()
    measured = {"batch1": {e2e.HF_EAGER: dict(tok_s=100.0, note="greedy"),
                           e2e.GPTFAST: dict(tok_s=300.0, ttft_ms=2.0, note="greedy"),
                           e2e.GPTFAST_INT8: dict(tok_s=150.0, note="greedy"),
                           e2e.CT2_FP32: dict(tok_s=200.0), e2e.CT2_INT8: dict(tok_s=100.0),
                           e2e.HF_STATIC: RuntimeError("no compiler"), e2e.GPTFAST_SAMPLED: KeyError("x")}}
    rows = e2e.build_rows(run, measured)  # batch 1 only: the run was cut short there
    by = {r["engine"]: r for r in rows}
    label = f"batch 1, {run.plan.prompt_len}+{run.plan.new_tokens} tok"
    fast = by[e2e.GPTFAST]
    assert fast["key"] == f"tiny | {label} | gptfast | fp32" and fast["status"] == "PASS"
    assert fast["speedup_hf"] == 3.0 and fast["speedup_ct2"] == 1.5 and fast["note"] == "greedy; 1.50x " + e2e.CT2_FP32
    assert by[e2e.GPTFAST_INT8]["speedup_ct2"] == 1.5 and by[e2e.GPTFAST_INT8]["dtype"] == "int8"
    fp32_bytes = e2e.weight_bytes_per_step(run.config, torch.float32)
    assert fast["weight_gbps"] == pytest.approx(fp32_bytes * 300 / 1e9) and fast["pct_bw"] == pytest.approx(
        fast["weight_gbps"] / CEILINGS.copy_gbps * 100)
    assert by[e2e.GPTFAST_INT8]["weight_gbps"] == pytest.approx(
        e2e.weight_bytes_per_step(run.config, torch.int8) * 150 / 1e9)
    assert (by[e2e.HF_STATIC]["status"], by[e2e.HF_STATIC]["note"]) == ("SKIP", "RuntimeError: no compiler")
    assert by[e2e.GPTFAST_SAMPLED]["status"] == "ERROR"  # a failure of a required contender
    assert "speedup_hf" not in by[e2e.HF_EAGER] and by[e2e.HF_EAGER]["status"] == "ref"
    assert [r["engine"] for r in rows] == [c.name for c in e2e.CONTENDERS if c.name in measured["batch1"]]

    measured["padded"] = {e2e.HF_EAGER: dict(tok_s=50.0), e2e.GPTFAST: dict(tok_s=100.0)}
    measured["continuous"] = {e2e.GPTFAST: dict(tok_s=200.0, note="engine")}
    rows = e2e.build_rows(run, measured)
    [cont] = [r for r in rows if r["scenario"].endswith("continuous batching")]
    assert cont["speedup_hf"] == 4.0  # over HF's padded batches
    assert "weight_gbps" not in cont  # tok/s of a batch is no weight stream


def test_decode_path_row_compares_the_fused_step_with_the_unfused_one():
    run = _fake_run("cuda", "bf16")
    measured = {"decode_path": {e2e.GPTFAST: dict(tok_s=500.0, note="greedy"),
                                e2e.GPTFAST_UNFUSED: dict(tok_s=250.0, note="greedy")}}
    rows = {r["engine"]: r for r in e2e.build_rows(run, measured)}
    assert rows[e2e.GPTFAST]["speedup_unfused"] == 2.0 and f"2.00x {e2e.GPTFAST_UNFUSED}" in rows[e2e.GPTFAST]["note"]
    assert rows[e2e.GPTFAST]["scenario"].startswith("decode path, batch 1")
    assert rows[e2e.GPTFAST_UNFUSED]["status"] == "ref" and rows[e2e.GPTFAST_UNFUSED]["weight_gbps"] > 0
    [scenario] = [s for s in e2e.SCENARIOS if s.name == "decode_path"]
    assert scenario.skip(run) is None and "eager reference" in scenario.skip(_fake_run())
    assert [c.name for c in e2e.CONTENDERS if scenario.takes(c)] == [e2e.GPTFAST, e2e.GPTFAST_UNFUSED]
    assert not any(s.takes(e2e.BY_NAME[e2e.GPTFAST_UNFUSED]) for s in e2e.SCENARIOS if s is not scenario)


def test_a_new_scenario_is_a_function_and_a_registry_line(monkeypatch):
    """What docs/benchmarks.md shows: a scenario added to the registry is measured and gets rows."""
    def measure_short(run, entrants, tick):
        out = {}
        for name, generate in entrants.items():
            ids = run.prompt[None, :4]
            out[name] = dict(tok_s=float(generate(ids, torch.ones_like(ids), 2).shape[1]), note="short")
            tick(name)
        return out

    short = e2e.Scenario("short", lambda plan: "4-token prompt", measure_short, lambda plan, n: n,
                         takes=lambda c: c.name in (e2e.HF_EAGER, e2e.GPTFAST))
    monkeypatch.setattr(e2e, "SCENARIOS", [short])
    partial = []
    rows, _ = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None,
                          on_rows=lambda rows, notes: partial.append(rows))
    assert [(r["scenario"], r["engine"], r["tok_s"], r["note"]) for r in rows] == [
        ("4-token prompt", e2e.HF_EAGER, 6.0, "short"), ("4-token prompt", e2e.GPTFAST, 6.0, "short")]
    assert rows[1]["speedup_hf"] == 1.0 and partial == [rows]


def test_bench_runs_every_model_in_every_dtype(monkeypatch, tmp_path, capsys):
    from gptfast.bench import ceilings

    calls = []

    def fake_run_e2e(device, dtype, quick, model, seed, ceilings, progress, on_rows):
        calls.append((model, dtype))
        if (model, dtype) == ("tiny-odd", "bf16"):
            raise RuntimeError("out of memory\nsecond line")
        row = dict(suite="e2e", key=f"{model} | batch 1 | gptfast | {dtype}", model=model, scenario="batch 1",
                   engine="gptfast", dtype=dtype, status="PASS", tok_s=1.0, primary="tok_s")
        return [row], [f"weights for {model}"]

    monkeypatch.setattr(e2e, "run_e2e", fake_run_e2e)
    monkeypatch.setattr(ceilings, "measure", lambda device, quick=False: CEILINGS)
    args = _parse(["--device", "cpu", "--models", "tiny, tiny-odd", "--dtype", "fp32,bf16", "--out", str(tmp_path),
                   "--formats", "json", "--no-progress"])
    assert run_bench(args) == 1  # one run errored
    assert calls == [("tiny", "fp32"), ("tiny", "bf16"), ("tiny-odd", "fp32"), ("tiny-odd", "bf16")]
    [path] = tmp_path.glob("e2e-*.json")
    doc = json.loads(path.read_text())
    assert [r["status"] for r in doc["rows"]] == ["PASS", "PASS", "PASS", "ERROR"]
    assert doc["rows"][3]["key"] == "tiny-odd | e2e | bf16" and doc["rows"][3]["note"] == "RuntimeError: out of memory"
    assert "tiny bf16: weights for tiny" in doc["notes"]
    assert "model" in doc["columns"]
    assert not list(tmp_path.glob("*.partial.json"))  # the complete file replaced it
    assert _parse(["--dtype", "fp16"]).dtype == ["fp16"] and _parse([]).model == ["gpt2"]
    with pytest.raises(SystemExit):
        _parse(["--dtype", "bf16,fp8"])
    assert "dtypes must be comma-separated" in capsys.readouterr().err


def test_summary_prints_kernel_and_graph_notes(tmp_path):
    from gptfast.bench import summary

    rows = [dict(key="gpt2 | b1 | gptfast | bf16", model="gpt2", scenario="batch 1", engine="gptfast",
                 dtype="bf16", status="PASS", tok_s=5000.0)]
    notes = ["random weights", "decode step at batch 1 (CUDA graphs off, so every launch shows): 86 kernels",
             "CUDA graphs: 24 batch-size buckets (1..256) captured in 3.10 s"]
    results.save("e2e", rows, tmp_path, e2e.COLUMNS, notes=notes, formats=["json"])
    text = summary.summarize(tmp_path, ["e2e suite: ok, 10s"])
    assert "86 kernels" in text and "captured in 3.10 s" in text and "random weights" not in text
    assert "gpt2 · batch 1" in text.splitlines()  # a heading per model and scenario
    assert any(line.split()[:3] == ["engine", "dtype", "check"] for line in text.splitlines())
    assert "86 kernels" in (tmp_path / "summary.md").read_text()


def test_summary_fits_100_columns(tmp_path):
    from gptfast.bench import summary

    engines = [e2e.HF_EAGER, e2e.REF_COMPILE, e2e.GPTFAST_NGRAM, e2e.GPTFAST_UNFUSED]
    rows = [dict(key=f"gpt2-medium | {s} | {e} | bf16", model="gpt2-medium", scenario=s, engine=e, dtype="bf16",
                 status="PASS", tok_s=12345.6, ttft_ms=1234.5, itl_p50_ms=0.123, itl_p99_ms=12.345, pct_bw=45.6,
                 speedup_hf=12.34, note="x" * 300)
            for s in ("batch 1, 128+256 tok", "mixed: 256 req, padded batches of 64") for e in engines]
    results.save("e2e", rows, tmp_path, e2e.COLUMNS, notes=["decode step at batch 1: " + "k " * 200],
                 formats=["json"])
    ops = [dict(key=f"decode_attention | B={b}", op="decode_attention", case=f"B={b} H=12 D=64 ctx=1024 bf16 split",
                status="PASS", fast_us=123.456, eager_us=1234.5, gbps=1234.5, tflops=12.34, pct_floor=56.7,
                speedup_eager=10.0, speedup_baselines="sdpa 1.23×, flash 0.98×") for b in (1, 256)]
    results.save("ops", ops, tmp_path, runner.COLUMNS, formats=["json"])
    text = summary.summarize(tmp_path, ["e2e suite: ok in 123 s; " + "word " * 40])
    assert max(map(len, text.splitlines())) <= summary.SUMMARY_WIDTH, max(text.splitlines(), key=len)
    assert "x" * 50 not in text  # row notes stay in the files
    assert text.count("gpt2-medium · ") == 2 and "decode_attention" in text.splitlines()


# ------------------------------------------------------------------------------ kernel count
def test_count_device_events_separates_kernels_copies_and_launches():
    from torch.autograd import DeviceType

    from gptfast.bench.kernel_count import count_device_events

    clock = iter(range(0, 1000, 10))  # each kernel starts 10 µs after the previous one

    def ev(name, device=DeviceType.CUDA, us=1.0):
        start = next(clock)
        return types.SimpleNamespace(name=name, device_type=device,
                                     time_range=types.SimpleNamespace(start=start, end=start + us))

    events = ([ev("gemv", us=4.0) for _ in range(5)] + [ev("layer_norm") for _ in range(3)] + [ev("attn", us=7.0)]
              + [ev("Memcpy HtoD (Pinned -> Device)")] * 2
              + [ev("Memset (Device)")] + [ev("cudaLaunchKernel", DeviceType.CPU)] * 8
              + [ev("cuLaunchKernelEx", DeviceType.CPU), ev("cudaGraphLaunch", DeviceType.CPU)]
              + [ev("aten::mm", DeviceType.CPU)] * 4 + [ev("cudaMemcpyAsync", DeviceType.CPU)])
    counts = count_device_events(events, top=2)
    times = counts.pop("kernel_us")
    assert counts == dict(kernels=9, copies=3, launch_calls=10, top=[("gemv", 5), ("layer_norm", 3)],
                          kernel_sum_us=30.0, device_span_us=87.0)  # first start 0, last (attn) ends 80 + 7
    assert times == [("attn", 7.0)] + [("gemv", 4.0)] * 5 + [("layer_norm", 1.0)] * 3  # longest first


def test_one_decode_step_is_profiled_on_the_cpu():
    from torch.profiler import ProfilerActivity

    import gptfast
    from gptfast.bench.kernel_count import kernels_per_decode_step, profile_one_decode_step

    model = gptfast.GPT2.from_config("tiny", seed=0)
    calls = []
    forward = model.forward_paged

    def spy(tokens, positions, meta, *rest, **kwargs):
        calls.append((torch.autograd._profiler_enabled(), meta.is_decode, tokens.shape[0]))
        return forward(tokens, positions, meta, *rest, **kwargs)

    model.forward_paged = spy
    prof, outs = profile_one_decode_step(model, 3, False, [ProfilerActivity.CPU])
    assert len(outs) == 3 and {o.index for o in outs} == {2}
    assert [c for c in calls if c[0]] == [(True, True, 3)]  # exactly one forward while profiling: a decode of 3
    assert calls[0] == (False, False, 3 * 32)  # the prefill of three 32-token prompts
    # the step's matmuls: F.linear, or oneDNN's linear on a prepacked weight (fp32, 3+ rows)
    assert any(e.name in ("aten::linear", "mkldnn::_linear_pointwise") for e in prof.events())
    with pytest.raises(RuntimeError, match="the model is on cpu, it needs a CUDA device"):
        kernels_per_decode_step(model)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_kernels_per_decode_step_on_cuda(batch):
    import gptfast
    from gptfast.bench.kernel_count import kernels_per_decode_step

    model = gptfast.GPT2.from_config("gpt2", seed=0, dtype=torch.bfloat16, device="cuda")
    eager = kernels_per_decode_step(model, batch_size=batch, graphs=False)
    L = model.config.n_layer
    # at least the four matmuls and the attention of every layer, and the head
    assert eager["kernels"] >= 5 * L + 1, eager
    assert eager["top"] == sorted(eager["top"], key=lambda t: -t[1])
    assert sum(n for _, n in eager["top"]) <= eager["kernels"]
    graphed = kernels_per_decode_step(model, batch_size=batch, graphs=True)
    assert graphed["kernels"] >= 5 * L + 1, graphed  # the graph's kernels are still seen
    assert graphed["launch_calls"] <= graphed["kernels"] // 4, graphed  # but launched as one graph
    assert eager["launch_calls"] > graphed["launch_calls"], (eager, graphed)
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
@pytest.mark.parametrize("name", ["gpu_check", "gpu_e2e"])
def test_gpu_scripts_without_gpu_say_so_and_exit_0(tmp_path, name):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.sh"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no nvidia-smi on this PATH
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO GPU HERE" in done.stdout
    assert (tmp_path / "out" / f"{name}.log").exists()

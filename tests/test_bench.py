"""The benchmark runner (gptfast/bench): correctness before timing, result files, table, compare."""

import argparse
import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from gptfast.bench import add_bench_arguments, run_bench
from gptfast.bench import e2e, provenance, results, runner
from gptfast.bench.ceilings import Ceilings
from gptfast.ops.common import BenchCase


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
    assert "gptfast.ops.attention" in names


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
    assert facts["torch"] == torch.__version__.split("+")[0] or facts["torch"].startswith(torch.__version__.split("+")[0])
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
    batches = e2e.padded_batches([(120, 32), (5, 32), (60, 10)], batch_size=2, vocab=100, n_positions=128, seed=0)
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


def test_e2e_mismatch_is_reported_and_not_timed(monkeypatch):
    _gptfast_off_by_one(monkeypatch)
    monkeypatch.setattr(e2e, "_batch1", lambda *a, **k: pytest.fail("timed after a failed check"))
    monkeypatch.setattr(e2e, "_mixed", lambda *a, **k: pytest.fail("timed after a failed check"))
    rows, notes = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None)
    assert len(rows) == 1 and rows[0]["status"] == "FAIL"
    assert "tokens differ" in rows[0]["note"] and "RANDOMLY INITIALISED" in notes[0]


def test_e2e_near_tie_is_noted_and_timed(monkeypatch):
    _gptfast_off_by_one(monkeypatch)
    monkeypatch.setattr(e2e, "TIE_TOL", 1e9)  # every logit gap counts as a tie
    timed = []

    def stub(engines, *args, **kwargs):
        timed.append(1)
        return {e.name: RuntimeError("not timed in this test") for e in engines}

    monkeypatch.setattr(e2e, "_batch1", stub)
    monkeypatch.setattr(e2e, "_mixed", stub)
    rows, notes = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None)
    assert timed == [1, 1], "a near-tie must not stop the timing"
    assert any("near-tie" in n for n in notes)
    assert not any(r["status"] == "FAIL" for r in rows)


@pytest.mark.slow
def test_e2e_tiny_runs_and_matches_hf():
    rows, notes = e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", ceilings=CEILINGS, progress=False,
                              log=lambda s: None)
    by = {(r["scenario"].split(",")[0].split(":")[0], r["engine"]): r for r in rows}
    fast = by[("batch 1", "gptfast")]
    assert fast["status"] == "PASS" and fast["tok_s"] > 0 and fast["ttft_ms"] > 0
    assert fast["itl_p99_ms"] >= fast["itl_p50_ms"] > 0 and fast["pct_bw"] > 0 and fast["speedup_hf"] > 0
    assert by[("mixed", "gptfast")]["tok_s"] > 0 and by[("mixed", "HF generate (eager, sdpa)")]["status"] == "ref"
    assert any("weights read per decode step" in n for n in notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_gpu_check_without_gpu_says_so_and_exits_0(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no nvidia-smi on this PATH
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO GPU HERE" in done.stdout
    assert (tmp_path / "out" / "gpu_check.log").exists()

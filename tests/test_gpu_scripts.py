"""The GPU check keeps what it measured: partial result files rewritten as rows come, a run cut by
SIGINT/SIGTERM or a timeout leaves its rows, the per-test timeout without pytest-timeout, the test
file order of benchmarks/gpu_check.sh."""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gptfast.bench import add_bench_arguments, e2e, results, run_bench
from gptfast.bench.ceilings import Ceilings

ROOT = Path(__file__).resolve().parents[1]
CEILINGS = Ceilings(device="cpu", copy_gbps=1.0, matmul_tflops=1.0, matmul_dtype="float32", copy_bytes=1,
                    matmul_n=1)
FACTS = {"device": "cpu", "device_kind": "cpu", "command": "test"}


def test_partial_results_file_lifecycle(tmp_path):
    partial = results.PartialResults("e2e", tmp_path, ["a"], provenance=FACTS, notes=["n0"])
    doc = json.loads(partial.path.read_text())  # written at once, before any row
    assert partial.path.name.endswith(".partial.json") and doc["partial"] is True and doc["rows"] == []
    partial.update([{"a": 1}, {"a": 2}])
    assert [r["a"] for r in results.load(partial.path)["rows"]] == [1, 2]
    partial.interrupted("SIGINT")
    doc = results.load(partial.path)
    assert doc["notes"][0] == "n0" and "PARTIAL" in doc["notes"][-1] and len(doc["rows"]) == 2
    assert not list(tmp_path.glob("*.tmp"))
    partial.finish()
    assert not partial.path.exists() and partial.finished


def _stub_e2e_phases(monkeypatch):
    def batch1(entrants, *args, **kwargs):
        return {name: RuntimeError("not timed in this test") for name in entrants}

    def cut(*args, **kwargs):
        raise KeyboardInterrupt("cut after batch 1")

    # the fp32 check passes without generating (the timed rows here are all errors: nothing to compare)
    monkeypatch.setattr(e2e, "_fp32_check", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(e2e, "_batch1", batch1)
    monkeypatch.setattr(e2e, "_mixed", cut)


def test_e2e_hands_over_rows_after_each_phase(monkeypatch):
    _stub_e2e_phases(monkeypatch)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        e2e.run_e2e("cpu", "fp32", quick=True, model="tiny", progress=False, log=lambda s: None,
                    on_rows=lambda rows, notes: seen.append((rows, notes)))
    [(rows, notes)] = seen  # after batch 1; the cut came in the mixed phase
    assert rows and all(r["scenario"].startswith("batch 1") for r in rows)
    assert {r["engine"] for r in rows} >= {e2e.HF_EAGER, e2e.GPTFAST}
    assert any("RANDOMLY INITIALISED" in n for n in notes)


def _bench_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(["--suite", "e2e", "--device", "cpu", "--model", "tiny", "--out", str(tmp_path),
                              "--formats", "json", "--no-progress", *extra])


def test_interrupted_bench_leaves_its_rows(monkeypatch, tmp_path):
    monkeypatch.setattr("gptfast.bench.ceilings.measure", lambda device, quick: CEILINGS)
    _stub_e2e_phases(monkeypatch)
    assert run_bench(_bench_args(tmp_path, "--quick")) == 130
    [path] = tmp_path.glob("e2e-*.json")
    doc = results.load(path)
    assert path.name.endswith(".partial.json") and doc["partial"] is True
    assert doc["rows"] and all(r["scenario"].startswith("batch 1") for r in doc["rows"])
    assert "PARTIAL" in doc["notes"][-1] and doc["provenance"]["ceilings"]["copy_gbps"] == 1.0


def test_sigterm_ends_the_bench_like_sigint(monkeypatch, tmp_path):
    monkeypatch.setattr("gptfast.bench.ceilings.measure", lambda device, quick: CEILINGS)

    def terminated(*args, on_rows, **kwargs):
        on_rows([{"key": "k", "scenario": "batch 1", "engine": "x", "status": "ref"}], ["measured"])
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(e2e, "run_e2e", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert run_bench(_bench_args(tmp_path)) == 130
    assert signal.getsignal(signal.SIGTERM) is before
    [path] = tmp_path.glob("e2e-*.partial.json")
    assert [r["key"] for r in results.load(path)["rows"]] == ["k"]


def test_finished_bench_leaves_no_partial_file(monkeypatch, tmp_path):
    monkeypatch.setattr("gptfast.bench.ceilings.measure", lambda device, quick: CEILINGS)
    monkeypatch.setattr(e2e, "run_e2e", lambda *a, on_rows, **k: (
        [{"key": "k", "scenario": "batch 1", "engine": "x", "status": "ref"}], ["measured"]))
    assert run_bench(_bench_args(tmp_path)) == 0
    assert [p.name.endswith(".partial.json") for p in tmp_path.glob("e2e-*.json")] == [False]


def test_dry_run_cut_by_its_budget_brings_back_the_partial_json(tmp_path):
    """benchmarks/gpu_check.sh on the CPU with a budget too short for its e2e step: the step is cut
    by SIGINT, and the e2e JSON is there, marked partial; the later steps are skipped."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    # gpt2 (124M): its e2e step cannot finish in the budget, however quiet the machine
    env.update(GPU_CHECK_DEVICE="cpu", GPU_CHECK_BUDGET_S="12", GPU_CHECK_MODEL="gpt2", STEP_GRACE_S="20",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert "e2e suite --quick: TIMEOUT after 12s" in log, log[-3000:]
    assert "pytest -m gpu: skipped (budget)" in log
    [path] = out.glob("e2e-*.json")
    doc = results.load(path)
    assert path.name.endswith(".partial.json") and doc["partial"] is True, path
    assert "PARTIAL" in doc["notes"][-1] and doc["provenance"]["command"]
    assert (out / "summary.md").exists() and path.name in (out / "summary.md").read_text()


def _gpu_test_files() -> list[str]:
    done = subprocess.run(["bash", "-c", "source benchmarks/gpu_lib.sh && gpu_test_files"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_gpu_check_runs_every_test_file_once_most_revealing_first():
    files = _gpu_test_files()
    assert sorted(files) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    assert files[:3] == ["tests/test_attention.py", "tests/test_norm.py", "tests/test_graphs.py"]
    assert files[-1] == "tests/test_static_ref.py"  # the inductor compile, last


def test_per_test_timeout_without_the_plugin(tmp_path):
    """GPTFAST_TEST_TIMEOUT_S fails the test that overruns (SIGALRM fallback of tests/conftest.py
    when pytest-timeout is absent, else the plugin) and the run goes on to its summary."""
    (tmp_path / "test_sleepy.py").write_text(textwrap.dedent("""
        import time

        def test_overruns():
            time.sleep(30)

        def test_quick():
            assert True
    """))
    env = dict(os.environ, GPTFAST_TEST_TIMEOUT_S="1", PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_sleepy.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-2000:]
    assert "Timeout" in done.stdout or "GPTFAST_TEST_TIMEOUT_S=1" in done.stdout

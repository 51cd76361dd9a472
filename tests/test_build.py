"""Builds the C++ test executable with CMake (plain, and with ASan + UBSan) and runs it.

The executable (csrc/test_block_manager.cpp) runs focused cases and thousands of random
operations with check_invariants() after each; the sanitized build also catches out-of-bounds
accesses, use-after-free and undefined behaviour in the core. Skipped without cmake or a C++
compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str | None:
    try:
        import cmake

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("cmake")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or \
        shutil.which("clang++")


def _build_and_run(tmp_path: Path, sanitize: bool) -> str:
    cmake = _cmake()
    if cmake is None or _compiler() is None:
        pytest.skip("needs cmake and a C++ compiler")
    build = tmp_path / ("asan" if sanitize else "plain")
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DGPTFAST_BUILD_EXTENSION=OFF",
                 f"-DGPTFAST_SANITIZE={'ON' if sanitize else 'OFF'}",
                 f"-DCMAKE_BUILD_TYPE={'Debug' if sanitize else 'Release'}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, [cmake, "--build", str(build), "--target", "test_block_manager"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    # Fewer random runs under the sanitizers: they are ~5x slower.
    proc = subprocess.run([str(build / "test_block_manager"), "60" if sanitize else "200"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"test_block_manager failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_cpp_unit_test(tmp_path):
    assert "all checks passed" in _build_and_run(tmp_path, sanitize=False)


@pytest.mark.slow
def test_cpp_unit_test_sanitized(tmp_path):
    assert "all checks passed" in _build_and_run(tmp_path, sanitize=True)

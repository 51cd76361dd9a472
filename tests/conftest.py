"""Test set-up shared by every test file.

On a machine where torch sees no CUDA GPU the Triton kernels run in Triton's CPU interpreter.
The interpreter is chosen when a kernel is *defined*, so TRITON_INTERPRET is set here, before
anything imports gptfast (importing torch does not define any kernel).

Per-test timeout: `GPTFAST_TEST_TIMEOUT_S=N` fails any test that runs longer than N seconds, so
a run cut by an outer timeout still reaches its summary (benchmarks/gpu_check.sh sets it). With
the pytest-timeout plugin installed it becomes the plugin's `--timeout` (unless given on the
command line); without it a SIGALRM fallback here does the same on the main thread.
"""

import os
import signal

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _test_timeout() -> float | None:
    value = os.environ.get("GPTFAST_TEST_TIMEOUT_S", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise pytest.UsageError(f"GPTFAST_TEST_TIMEOUT_S must be a number of seconds, got {value!r}") from None
    return seconds if seconds > 0 else None


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout's own configure reads its option
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background by a non-interactive shell: without this a timeout's SIGINT
        # would be ignored and pytest killed before its summary
        signal.signal(signal.SIGINT, signal.default_int_handler)
    seconds = _test_timeout()
    if seconds is not None and config.pluginmanager.hasplugin("timeout"):
        if getattr(config.option, "timeout", None) is None:
            config.option.timeout = seconds  # pytest-timeout reads it per test


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """The per-test timeout without pytest-timeout: SIGALRM fails the test that overran."""
    seconds = _test_timeout()
    if seconds is None or item.config.pluginmanager.hasplugin("timeout") or not hasattr(signal, "setitimer"):
        yield
        return

    def overran(signum, frame):
        pytest.fail(f"test exceeded GPTFAST_TEST_TIMEOUT_S={seconds:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, overran)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors, so any output element (or split-KV
    partial) a kernel forgets to write shows up as NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)

"""`gptfast generate` and `gptfast bench` as a user runs them: subprocesses (interactive ones
through a pseudo-terminal) with exit codes and messages checked; hub names through a Hugging Face
cache the tests build; Triton missing simulated with a blocked import."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfast import get_config
from gptfast.cli import _PrintStreamer, main

from checkpoints import make_hf_model, save_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]  # the checkout under test (CI tests a fresh clone)
REVISION = "0123456789abcdef0123456789abcdef01234567"
# Run `code` with `import triton` failing, as on a platform without Triton wheels.
NO_TRITON = "import sys; sys.modules['triton'] = None; "


def run(args, *, cwd, env=None, code=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m gptfast ARGS` (or `python -c CODE ARGS`) importing this checkout's gptfast."""
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "no-hf-home"))
    full.update(env or {})
    head = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "gptfast"]
    return subprocess.run(head + list(args), cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    """The run failed with status 2 and a single `error: ...` line naming each `expected` text."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert lines and lines[-1].startswith("error: "), done.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny HF checkpoint with a tokenizer of 598 ids (the model's vocabulary has 1000)."""
    hf = make_hf_model(get_config("tiny"), seed=0)
    return save_hf_checkpoint(hf, tmp_path_factory.mktemp("cli"), with_tokenizer=True)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, folder):
    """An HF_HOME whose hub cache holds `folder` as the model "gpt2" (refs/main -> a snapshot)."""
    import shutil

    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--gpt2"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


# --------------------------------------------------------------------------- model names


def test_hub_name_resolves_through_the_hf_cache(hf_home, tmp_path):
    env = dict(HF_HOME=str(hf_home))
    code = ("import gptfast; m = gptfast.GPT2.from_pretrained('gpt2'); "
            "print(m.source); print(m.config.n_embd, m.tokenizer_dir is not None)")
    done = run([], cwd=tmp_path, env=env, code=code)
    assert done.returncode == 0, done.stderr
    source, facts = done.stdout.strip().splitlines()
    assert str(hf_home / "hub" / "models--gpt2" / "snapshots" / REVISION) in source
    assert facts == "64 True"

    done = run(["generate", "gpt2", "--prompt", "The quick brown fox", "--max-new-tokens", "4", "--seed", "0"],
               cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The quick brown fox")  # the prompt is echoed
    assert "random" not in done.stderr.lower()
    assert "fewer than the model's vocabulary (1000)" in done.stderr  # 598 tokenizer ids


def test_hub_name_not_in_the_cache_is_one_clear_error(hf_home, tmp_path):
    env = dict(HF_HOME=str(hf_home))
    line = one_error_line(run(["generate", "gpt2-medium", "--ids", "1"], cwd=tmp_path, env=env),
                          str(hf_home / "hub"), "--random-weights", "gpt2-medium")
    assert "presets: gpt2, gpt2-medium" in line
    done = run([], cwd=tmp_path, env=env,
               code="import gptfast; gptfast.GPT2.from_pretrained('openai-community/gpt2-xl')")
    assert done.returncode == 1 and "FileNotFoundError" in done.stderr and str(hf_home / "hub") in done.stderr


def test_random_weights_only_when_asked_for(tmp_path):
    done = run(["generate", "tiny", "--random-weights", "--ids", "1,2,3", "--max-new-tokens", "5", "--seed", "0",
                "--num-samples", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "random weights" in done.stderr and "the text is noise" in done.stderr
    samples = re.split(r"=+ SAMPLE \d+ =+\n", done.stdout)
    assert samples[0] == "" and len(samples) == 3
    for sample in samples[1:]:
        ids = sample.split()
        assert ids[:3] == ["1", "2", "3"] and len(ids) <= 8  # the prompt echoed, then up to 5 new ids
    assert done.stderr.count("tokens/s") == 2
    # without the flag a preset name is a hub name, and this cache is empty
    one_error_line(run(["generate", "tiny", "--ids", "1"], cwd=tmp_path), "not in the cache", "--random-weights")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, expected", [
    (["/nonexistent/path", "--prompt", "Hi"], ["no such file or folder", "/nonexistent/path"]),
    (["gpt-2", "--random-weights", "--ids", "1"], ["needs a preset name", "did you mean 'gpt2'", "tiny-odd"]),
    (["tiny", "--random-weights", "--num-samples", "0", "--ids", "1"], ["--num-samples must be >= 1, got 0"]),
    (["tiny", "--random-weights", "--num-beams", "0", "--ids", "1"], ["--num-beams must be >= 1"]),
    (["tiny", "--random-weights", "--num-beams", "2", "--num-samples", "2", "--ids", "1"], ["--num-samples > 1"]),
    (["tiny", "--random-weights", "--num-samples", "-2", "--ids", "1"], ["--num-samples must be >= 1, got -2"]),
    (["tiny", "--random-weights", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    (["tiny", "--random-weights", "--top-p", "1.5"], ["--top-p must be in (0, 1], got 1.5"]),
    (["tiny", "--random-weights", "--temperature", "0"], ["--temperature must be > 0", "--greedy"]),
    (["tiny", "--random-weights", "--dtype", "fp8"], ["unknown dtype 'fp8'", "bf16", "bfloat16"]),
    (["tiny", "--random-weights", "--ids", "1,x"], ["integers"]),
    (["tiny", "--random-weights", "--ids", "5000"], ["5000", "vocabulary [0, 1000)"]),
    (["tiny", "--random-weights", "--prompt", "hi"], ["--prompt needs a tokenizer", "--ids"]),
    (["tiny", "--random-weights", "--bogus"], ["unrecognized arguments: --bogus"]),
], ids=["missing-path", "preset-typo", "num-samples-0", "num-beams-0", "beams-with-samples", "num-samples-negative",
        "max-new-tokens-0", "top-p", "temperature", "dtype", "ids-not-int", "ids-outside-vocab",
        "prompt-without-tokenizer", "unknown-option"])
def test_argument_errors_are_one_line_before_loading(args, expected, tmp_path):
    done = run(["generate", *args], cwd=tmp_path)
    one_error_line(done, *expected)
    assert "loading" not in done.stderr and "building" not in done.stderr  # nothing was loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path):
    one_error_line(run(["generate", "tiny", "--random-weights", "--device", "cuda", "--ids", "1"], cwd=tmp_path),
                   "--device cuda", "no CUDA GPU", "--device cpu")
    one_error_line(run(["bench", "--device", "cuda"], cwd=tmp_path), "--device cuda", "no CUDA GPU")


def test_bench_argument_errors(tmp_path):
    one_error_line(run(["bench", "--dtype", "bf16,fp8"], cwd=tmp_path), "fp32,bf16,fp16", "'bf16,fp8'")
    one_error_line(run(["bench", "--formats", "xml"], cwd=tmp_path), "--formats")


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16"])
def test_both_dtype_spellings(spelling, capsys):
    assert main(["generate", "tiny", "--random-weights", "--ids", "1,2", "--max-new-tokens", "2",
                 "--dtype", spelling]) == 0
    assert "(bf16, cpu)" in capsys.readouterr().err


def test_bench_takes_both_dtype_spellings():
    import argparse

    from gptfast.bench import add_bench_arguments

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert parser.parse_args(["--dtype", "bfloat16,fp16,float32,bf16"]).dtype == ["bf16", "fp16", "fp32"]


# ------------------------------------------------------------------ output, in process


def test_greedy_matches_generate(capsys):
    import gptfast

    assert main(["generate", "tiny", "--random-weights", "--ids", "4 5 6", "--max-new-tokens", "4", "--greedy"]) == 0
    streamed = [int(t) for t in capsys.readouterr().out.split()]
    model = gptfast.GPT2.from_config(get_config("tiny"), seed=0)
    ref = gptfast.generate(model, torch.tensor([[4, 5, 6]]), max_new_tokens=4, pad_token_id=0)
    assert streamed == ref[0].tolist()  # prompt echoed, then the same tokens as generate()


def test_end_of_text_ends_the_sample_and_is_not_printed(folder):
    from gptfast.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    eos = tok.eos_token_id
    out = io.StringIO()
    streamer = _PrintStreamer(tok, "Hi", {eos}, out=out)
    streamer.put(torch.tensor([[1, 2]]))  # the prompt: echoed as given
    for token in tok.encode(" the dog") + [eos] + tok.encode(" cat"):
        streamer.put(torch.tensor([token]))
    streamer.put(torch.tensor([tok.vocab_size + 3]))  # after EOS: nothing more is text
    streamer.end()
    assert out.getvalue() == "Hi the dog\n" and streamer.ended
    out = io.StringIO()
    streamer = _PrintStreamer(tok, "", set(), out=out)
    streamer.put(torch.tensor([[1]]))
    streamer.put(torch.tensor([tok.vocab_size + 3]))  # an id the tokenizer lacks
    streamer.end()
    assert out.getvalue() == f"<{tok.vocab_size + 3}>\n"


def test_unconditional_and_existing_folder(folder, tmp_path, monkeypatch, capsys):
    import shutil

    assert main(["generate", str(folder), "--max-new-tokens", "3", "--seed", "2"]) == 0
    assert "3 tokens" in capsys.readouterr().err
    shutil.copytree(folder, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "tiny", "--prompt", "The dog", "--max-new-tokens", "2", "--seed", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The dog") and "random" not in out.err and "Hugging Face" not in out.err


def test_help_is_fast_and_imports_nothing_heavy(tmp_path):
    done = run(["generate", "--help"], cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and "--random-weights" in done.stdout
    code = ("import sys, gptfast.cli, gptfast.bench; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'matplotlib', 'huggingface_hub')))")
    assert run([], cwd=tmp_path, code=code, timeout=60).stdout.strip() == "False"


def test_no_module_imports_triton_directly():
    """Triton comes through gptfast/ops/_triton.py, so that gptfast imports where it is missing."""
    offenders = []
    for path in (REPO / "gptfast").rglob("*.py"):
        if path == REPO / "gptfast" / "ops" / "_triton.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "triton" or n.startswith("triton.") for n in names):
                # a function-level import that handles ImportError is lazy already (bench timing)
                if not isinstance(node, ast.ImportFrom) or node.col_offset == 0:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"import triton through gptfast.ops._triton instead: {offenders}"


# ------------------------------------------------------------------------ without Triton


def test_without_triton_the_cpu_path_and_the_bench_run(tmp_path):
    cli = NO_TRITON + "from gptfast.cli import main; sys.exit(main())"
    done = run(["generate", "tiny", "--random-weights", "--ids", "1,2", "--max-new-tokens", "3", "--seed", "0"],
               cwd=tmp_path, code=cli)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 5
    done = run(["bench", "--suite", "ops", "--quick", "--ops", "add_layernorm", "--no-progress", "--no-plots",
                "--out", str(tmp_path / "out")], cwd=tmp_path, code=cli, env=dict(TRITON_INTERPRET=""))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Triton is not installed" in done.stdout and "the Triton kernels were skipped" in done.stdout
    assert "ref only" in done.stdout and "restarting" not in done.stdout
    done = run([], cwd=tmp_path, code=NO_TRITON + (
        "import torch, gptfast.ops as ops\n"
        "with ops.backend('triton'): ops.bias_gelu_(torch.ones(2, 4), torch.ones(4))"))
    assert done.returncode == 1 and "GPTFAST_KERNELS=triton), but Triton is not installed" in done.stderr


# ---------------------------------------------------------------------------- the bench


def test_bench_default_run_writes_outside_the_checkout(tmp_path):
    """What a new user runs (small): results in the user's data folder, a PNG, tables within
    120 columns, `results: <folder>` last."""
    data = tmp_path / "xdg"
    done = run(["bench", "--model", "tiny", "--quick", "--dtype", "float32"], cwd=tmp_path,
               env=dict(XDG_DATA_HOME=str(data)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out_dir = data / "gptfast" / "bench"
    assert done.stdout.rstrip().splitlines()[-1] == f"results: {out_dir}"
    assert sorted(p.suffix for p in out_dir.iterdir()) == [".csv", ".json", ".md", ".png"]
    assert {p.name for p in tmp_path.iterdir()} <= {"xdg", "no-hf-home"}  # nothing written where it ran
    tables = done.stdout[done.stdout.index("\ne2e on "):]
    assert max(map(len, tables.splitlines())) <= 120, max(tables.splitlines(), key=len)
    assert "torch threads" in done.stdout and "e2e timing" in done.stderr  # the progress bar ran


# ---------------------------------------------------------------- interactive (a terminal)


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    """A tiny checkpoint with a long context and no tokenizer, so a sample runs long enough to
    be interrupted."""
    hf = make_hf_model(get_config("tiny").replace(n_positions=4096), seed=0)
    return save_hf_checkpoint(hf, tmp_path_factory.mktemp("long"))


def _spawn(folder, tmp_path, *args):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    child = pexpect.spawn(sys.executable, ["-m", "gptfast", "generate", str(folder), *(args or ["--interactive"]),
                                           "--max-new-tokens", "4000", "--seed", "0"],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=300)  # a loaded CI machine
    if not args:
        child.expect_exact("Token ids >>> ")
    return child, pexpect


def test_interactive_ctrl_c_stops_the_sample_then_ctrl_d_exits(long_folder, tmp_path):
    child, pexpect = _spawn(long_folder, tmp_path)
    child.sendline("1 2 3")
    child.expect(r"1 2 3 \d+ \d+")  # the prompt echoed, tokens streaming
    child.sendintr()
    child.expect_exact("[interrupted after ")
    child.expect_exact("Token ids >>> ")  # back at the prompt, the model still usable
    child.sendline("4 5")
    child.expect(r"4 5 \d+ \d+")
    child.sendintr()
    child.expect_exact("Token ids >>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before.strip() == "" and "\n" in child.before  # the shell prompt gets its own line


def test_interactive_ctrl_c_at_the_prompt_exits_cleanly(long_folder, tmp_path):
    child, pexpect = _spawn(long_folder, tmp_path)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in child.before and "KeyboardInterrupt" not in child.before


def test_ctrl_c_stops_a_non_interactive_sample(long_folder, tmp_path):
    child, pexpect = _spawn(long_folder, tmp_path, "--ids", "1,2")
    child.expect(r"1 2 \d+ \d+")
    child.sendintr()
    child.expect_exact("[interrupted after ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.before


def test_a_request_longer_than_the_model_allows_is_one_error_line(tmp_path):
    """What only the loaded model can tell (prompt + new tokens beyond n_positions) is still one
    `error:` line and status 2, not a traceback."""
    done = run(["generate", "tiny", "--random-weights", "--ids", "1,2", "--max-new-tokens", "100000",
                "--device", "cpu"], cwd=tmp_path)
    one_error_line(done, "100000")
    assert "Traceback" not in done.stderr


def test_kernels_tells_a_usage_error_from_a_failure(tmp_path):
    """`gptfast kernels`: an argument it cannot take is status 2; a run that cannot work here (the
    kernels defined for Triton's interpreter) is a failure, status 1; one `error:` line each."""
    one_error_line(run(["kernels", "--context", "0", "--no-progress", "--out", str(tmp_path / "out")], cwd=tmp_path,
                       env=dict(TRITON_INTERPRET="")), "context must be in 1..")
    done = run(["kernels", "--no-progress", "--out", str(tmp_path / "out")], cwd=tmp_path,
               env=dict(TRITON_INTERPRET="1"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:] and "TRITON_INTERPRET" in lines[-1]


def test_bench_with_an_unknown_op_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    done = run(["bench", "--suite", "all", "--ops", "nosuch", "--no-progress", "--out", str(out)], cwd=tmp_path)
    one_error_line(done, "nosuch", "add_layernorm")
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())

"""`gptfast generate` end to end: presets and token ids, a checkpoint folder with its tokenizer,
the interactive loop, and errors."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from gptfast import get_config
from gptfast.cli import main

from checkpoints import make_hf_model, save_hf_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = get_config("tiny").replace(vocab_size=1000)
    hf = make_hf_model(config, seed=0)
    return save_hf_checkpoint(hf, tmp_path_factory.mktemp("cli"), with_tokenizer=True)


def test_preset_with_ids_streams_tokens_and_reports_speed(capsys):
    rc = main(["generate", "tiny", "--ids", "1,2,3", "--max-new-tokens", "5", "--seed", "0"])
    out = capsys.readouterr()
    assert rc == 0
    assert len(out.out.split()) == 5  # five token ids streamed
    assert "randomly initialised" in out.err and "tokens/s" in out.err
    rc = main(["generate", "tiny", "--ids", "1,2,3", "--max-new-tokens", "5", "--seed", "0"])
    assert capsys.readouterr().out == out.out  # the seed reproduces the sample


def test_greedy_matches_generate(capsys):
    import gptfast

    main(["generate", "tiny", "--ids", "4 5 6", "--max-new-tokens", "4", "--greedy"])
    streamed = [int(t) for t in capsys.readouterr().out.split()]
    model = gptfast.GPT2.from_config(get_config("tiny"), seed=0)
    ref = gptfast.generate(model, torch.tensor([[4, 5, 6]]), max_new_tokens=4, pad_token_id=0)
    assert streamed == ref[0, 3:].tolist()


def test_checkpoint_folder_with_text_prompt(folder, capsys):
    rc = main(["generate", str(folder), "--prompt", "The quick brown fox", "--max-new-tokens", "6",
               "--seed", "1", "--num-samples", "2"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.count("sample") == 2
    assert out.err.count("tokens/s") == 2


def test_unconditional(folder, capsys):
    assert main(["generate", str(folder), "--max-new-tokens", "3", "--seed", "2"]) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_interactive_loop_reads_until_eof(folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world\nThe dog\n"))
    assert main(["generate", str(folder), "--interactive", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err.count("tokens/s") == 2


def test_errors_are_clear(capsys):
    assert main(["generate", "tiny", "--prompt", "hi"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["generate", "tiny", "--ids", "1,x"]) == 2
    assert "integers" in capsys.readouterr().err
    assert main(["generate", "tiny", "--ids", "5000"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_python_m_gptfast_help_is_fast():
    out = subprocess.run([sys.executable, "-m", "gptfast", "generate", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--top-k" in out.stdout
    code = ("import sys, gptfast.cli, gptfast.bench; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_an_existing_folder_wins_over_a_preset_name(folder, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(folder, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "tiny", "--prompt", "The dog", "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert "randomly initialised" not in capsys.readouterr().err

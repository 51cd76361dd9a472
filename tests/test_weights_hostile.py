"""Hostile checkpoints: absurd or mistyped configs, escaping shard paths, non-finite or integer
weights, and special files where a file is expected. Each fails fast with a message naming the
field, tensor or file and the real cause."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptfast import GPT2
from gptfast.config import PRESETS, GPT2Config
from gptfast.weights import load_checkpoint

from checkpoints import make_hf_model, make_nanogpt_checkpoint, save_hf_checkpoint

CONFIG = PRESETS["tiny-odd"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model(CONFIG, seed=0), tmp_path_factory.mktemp("hf") / "model")


def _copy(hf_dir, dst, config_changes=None, weights=None):
    """A copy of the checkpoint folder with config.json fields changed and/or other weights."""
    dst.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(config_changes or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(hf_dir / "model.safetensors")) if weights is None else weights
    save_file(sd, str(dst / "model.safetensors"))
    return dst


# ---------------------------------------------------------------------------- configs
def test_an_absurd_layer_count_fails_before_allocating_anything(hf_dir, tmp_path):
    folder = _copy(hf_dir, tmp_path / "m", {"n_layer": 10**6})
    with pytest.raises(ValueError, match=r"config describes .*n_layer=1000000.*GiB") as err:
        load_checkpoint(folder)
    assert "model.safetensors" in str(err.value)


def test_an_absurd_nanogpt_config_fails_before_allocating_anything(tmp_path):
    path = make_nanogpt_checkpoint(tmp_path / "ckpt.pt", n_layer=1, n_head=2, n_embd=8,
                                   block_size=16, vocab_size=32, bias=True)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"]["n_layer"] = 10**6
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"n_layer=1000000"):
        load_checkpoint(path)


@pytest.mark.parametrize("field", ["n_layer", "n_head", "n_embd", "vocab_size", "n_positions"])
def test_a_bool_where_an_int_belongs_is_refused(hf_dir, tmp_path, field):
    folder = _copy(hf_dir, tmp_path / "m", {field: True})
    with pytest.raises(ValueError, match=rf"{field} must be a positive int, got True"):
        load_checkpoint(folder)


@pytest.mark.parametrize("field, value", [("n_layer", True), ("n_inner", False),
                                          ("bos_token_id", True), ("layer_norm_epsilon", True),
                                          ("bias", 1), ("tie_word_embeddings", "yes")])
def test_gpt2config_refuses_the_wrong_types(field, value):
    with pytest.raises(ValueError, match=f"GPT2Config.{field}"):
        GPT2Config(**{field: value})


def test_a_deeply_nested_config_is_a_clear_error(hf_dir, tmp_path):
    folder = _copy(hf_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"n_layer": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_checkpoint(folder)


# ---------------------------------------------------------------------------- shard paths
@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_shard_paths_outside_the_folder_are_refused(hf_dir, tmp_path, escape):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    outside = tmp_path / "elsewhere.safetensors"
    save_file(load_file(str(hf_dir / "model.safetensors")), str(outside))
    shard = str(outside) if escape == "absolute" else "../elsewhere.safetensors"
    sd = load_file(str(outside))
    index = {"weight_map": {k: shard for k in sd}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        load_checkpoint(folder)


# ---------------------------------------------------------------------------- values
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_naming_the_tensor(hf_dir, tmp_path, bad):
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["transformer.h.1.mlp.c_fc.weight"][3, 5] = bad
    folder = _copy(hf_dir, tmp_path / "m", weights=sd)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*check_values=False"):
        load_checkpoint(folder)
    ckpt = load_checkpoint(folder, check_values=False)  # the opt-out
    assert not torch.isfinite(ckpt.state_dict["h.1.mlp.c_fc.weight"]).all()


def test_integer_weights_are_an_error_naming_the_tensor(hf_dir, tmp_path):
    sd = {k: (v * 100).to(torch.int32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    folder = _copy(hf_dir, tmp_path / "m", weights=sd)
    with pytest.raises(ValueError, match=r"weight '[\w.]+' has dtype torch\.int32"):
        load_checkpoint(folder)
    assert load_checkpoint(folder, check_values=False).state_dict["wte.weight"].dtype == torch.int32


def test_gpt2_from_pretrained_still_loads_a_clean_checkpoint(hf_dir):
    model = GPT2.from_pretrained(hf_dir)
    assert model.config.n_layer == CONFIG.n_layer


# ---------------------------------------------------------------------------- special files
def _special(kind, path):
    if kind == "symlink-loop":
        os.symlink(path.name, path)  # points at itself
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(path.parent / "nowhere", path)


CAUSE = {"symlink-loop": "symbolic link loop", "directory": "is a directory",
         "fifo": "named pipe", "broken-symlink": "broken symbolic link"}


@pytest.mark.parametrize("kind", list(CAUSE))
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_special_file_where_a_file_belongs_is_named_for_what_it_is(hf_dir, tmp_path, kind, name):
    folder = _copy(hf_dir, tmp_path / "m")
    (folder / name).unlink()
    _special(kind, folder / name)
    with pytest.raises((ValueError, FileNotFoundError), match=CAUSE[kind]) as err:
        load_checkpoint(folder)
    assert name in str(err.value)


@pytest.mark.parametrize("kind", ["symlink-loop", "fifo", "broken-symlink"])
def test_a_special_file_given_as_the_checkpoint_is_named_for_what_it_is(tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    _special(kind, path)
    with pytest.raises((ValueError, FileNotFoundError), match=CAUSE[kind]):
        load_checkpoint(path)


def test_a_special_shard_file_is_named_for_what_it_is(hf_dir, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "shard.safetensors" for k in sd}}))
    os.mkfifo(folder / "shard.safetensors")
    with pytest.raises(ValueError, match="named pipe"):
        load_checkpoint(folder)

"""gptfast.weights: every checkpoint source loads to the same tensors, and every bad one says why."""

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptfast.config import PRESETS
from gptfast.weights import Checkpoint, config_from_hf, load_checkpoint

from checkpoints import (
    CONV1D_SUFFIXES,
    hf_model_from_state_dict,
    make_hf_model,
    make_nanogpt_checkpoint,
    nanogpt_reference_logits,
    save_hf_checkpoint,
)

CONFIG = PRESETS["tiny-odd"]  # vocab 997, n_embd 60, 6 heads, 3 layers


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(CONFIG, seed=0)


@pytest.fixture(scope="module")
def expected(hf_model):
    """gptfast's state dict, computed straight from the HF model's parameters."""
    out = {}
    for name, p in hf_model.named_parameters():  # a tied lm_head is listed once, as wte
        key = name.removeprefix("transformer.")
        out[key] = p.detach().t() if key.endswith(CONV1D_SUFFIXES) else p.detach()
    return out


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return save_hf_checkpoint(hf_model, tmp_path_factory.mktemp("hf") / "model")


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), f"{key}: max abs diff {(actual[key] - value).abs().max()}"


def write_weights(folder, config_json: dict, state_dict: dict, name="model.safetensors"):
    """An HF-style folder holding exactly `config_json` and `state_dict`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json))
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / name))
    else:
        torch.save(state_dict, folder / name)
    return folder


def hf_folder_contents(hf_dir):
    return json.loads((hf_dir / "config.json").read_text()), load_file(str(hf_dir / "model.safetensors"))


# --- every source loads to the same tensors ------------------------------------------------


def _source(kind, hf_model, root):
    if kind == "live-GPT2LMHeadModel":
        return hf_model
    if kind == "live-GPT2Model":
        return hf_model.transformer
    if kind == "unprefixed-bin":
        # Laid out like openai-community/gpt2's pytorch_model.bin: no `transformer.` prefix,
        # causal-mask buffers stored, the tied head stored again.
        sd = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
        T = CONFIG.n_positions
        for i in range(CONFIG.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.ones(T, T, dtype=torch.uint8).tril().view(1, 1, T, T)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        sd["lm_head.weight"] = sd["wte.weight"]
        return write_weights(root / kind, hf_model.config.to_dict(), sd, "pytorch_model.bin")
    if kind == "unprefixed-safetensors":
        sd = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
        return write_weights(root / kind, hf_model.config.to_dict(), sd)
    options = {
        "safetensors": {},
        "bin": {"safetensors": False},
        "sharded-safetensors": {"sharded": True},
        "sharded-bin": {"safetensors": False, "sharded": True},
    }[kind]
    return save_hf_checkpoint(hf_model, root / kind, **options)


@pytest.mark.parametrize(
    "kind",
    [
        "safetensors",
        "bin",
        "sharded-safetensors",
        "sharded-bin",
        "unprefixed-bin",
        "unprefixed-safetensors",
        "live-GPT2LMHeadModel",
        "live-GPT2Model",
    ],
)
def test_every_hf_source_loads_the_same_tensors(kind, hf_model, expected, tmp_path):
    src = _source(kind, hf_model, tmp_path)
    if kind.startswith("sharded"):
        assert len(list(src.glob("*-of-*"))) >= 3, "the helper should have written several shards"
    ckpt = load_checkpoint(src)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.config == CONFIG
    assert_same_tensors(ckpt.state_dict, expected)
    assert ckpt.generation["eos_token_id"] == CONFIG.eos_token_id
    assert ckpt.generation["bos_token_id"] == CONFIG.bos_token_id
    assert ckpt.source


def test_conv1d_weights_are_transposed_to_linear_layout(hf_model, hf_dir):
    """Each (out, in) weight, applied as F.linear, computes exactly what HF's Conv1D module does."""
    sd = load_checkpoint(hf_dir).state_dict
    x = torch.randn(5, CONFIG.n_embd)
    for i, block in enumerate(hf_model.transformer.h):
        for name, module in [("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                             ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)]:
            inp = x if name != "mlp.c_proj" else torch.randn(5, CONFIG.mlp_dim)
            ours = torch.nn.functional.linear(inp, sd[f"h.{i}.{name}.weight"], sd[f"h.{i}.{name}.bias"])
            torch.testing.assert_close(ours, module(inp).detach(), rtol=1e-6, atol=1e-6)


def test_loaded_weights_reproduce_hf_logits(hf_model, hf_dir):
    ckpt = load_checkpoint(hf_dir)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    rebuilt = hf_model_from_state_dict(ckpt.config, ckpt.state_dict)
    torch.testing.assert_close(rebuilt(ids).logits, hf_model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtypes_are_kept_as_stored(hf_model, tmp_path, dtype):
    folder = save_hf_checkpoint(copy.deepcopy(hf_model).to(dtype), tmp_path / "half")
    sd = load_checkpoint(folder).state_dict
    assert {v.dtype for v in sd.values()} == {dtype}


def test_tokenizer_dir_is_reported(hf_model, hf_dir, tmp_path):
    assert load_checkpoint(hf_dir).tokenizer_dir is None
    folder = save_hf_checkpoint(hf_model, tmp_path / "tok", with_tokenizer=True)
    assert load_checkpoint(folder).tokenizer_dir == folder
    import transformers

    assert load_checkpoint(transformers.GPT2LMHeadModel.from_pretrained(folder)).tokenizer_dir == folder
    assert load_checkpoint(hf_model).tokenizer_dir is None


# --- the output head --------------------------------------------------------------------------


def test_untied_head_is_kept(tmp_path):
    model = make_hf_model(CONFIG.replace(tie_word_embeddings=False), seed=1)
    ckpt = load_checkpoint(save_hf_checkpoint(model, tmp_path / "untied"))
    assert ckpt.config.tie_word_embeddings is False
    assert torch.equal(ckpt.state_dict["lm_head.weight"], model.lm_head.weight.detach())
    assert not torch.equal(ckpt.state_dict["lm_head.weight"], ckpt.state_dict["wte.weight"])


def test_untied_config_with_a_head_equal_to_wte_is_tied(hf_dir, tmp_path):
    cfg, sd = hf_folder_contents(hf_dir)
    cfg["tie_word_embeddings"] = False
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    ckpt = load_checkpoint(write_weights(tmp_path / "m", cfg, sd))
    assert ckpt.config.tie_word_embeddings is True
    assert "lm_head.weight" not in ckpt.state_dict


def test_tied_config_with_a_distinct_stored_head_keeps_it_like_transformers(hf_dir, tmp_path):
    import transformers

    cfg, sd = hf_folder_contents(hf_dir)
    sd["lm_head.weight"] = torch.randn_like(sd["transformer.wte.weight"])
    folder = write_weights(tmp_path / "m", cfg, sd)
    with pytest.warns(UserWarning, match="different lm_head.weight; using the stored head untied"):
        ckpt = load_checkpoint(folder)
    assert ckpt.config.tie_word_embeddings is False
    assert torch.equal(ckpt.state_dict["lm_head.weight"], sd["lm_head.weight"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder)
    assert torch.equal(hf.lm_head.weight, sd["lm_head.weight"]), "transformers keeps the stored head"


def test_untied_config_without_a_head_is_an_error(hf_dir, tmp_path):
    cfg, sd = hf_folder_contents(hf_dir)
    cfg["tie_word_embeddings"] = False
    with pytest.raises(ValueError, match=r"missing key 'lm_head.weight' \(expected shape \(997, 60\)\)"):
        load_checkpoint(write_weights(tmp_path / "m", cfg, sd))


# --- nanoGPT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "orig_mod"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_nanogpt_checkpoint(tmp_path, bias, compiled):
    path = make_nanogpt_checkpoint(
        tmp_path / "out" / "ckpt.pt", n_layer=2, n_head=3, n_embd=48, block_size=40,
        vocab_size=501, bias=bias, compiled_prefix=compiled, seed=3,
    )  # fmt: skip
    ckpt = load_checkpoint(path)
    assert load_checkpoint(path.parent).config == ckpt.config  # the folder holding ckpt.pt
    c = ckpt.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (2, 3, 48, 40, 501)
    assert (c.activation, c.bias, c.tie_word_embeddings) == ("gelu", bias, True)
    assert ckpt.generation["eos_token_id"] is None  # vocab 501 has no GPT-2 <|endoftext|>

    stored = torch.load(path, weights_only=True)["model"]
    stored = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v for k, v in stored.items()}
    del stored["lm_head.weight"]  # tied to wte
    assert_same_tensors(ckpt.state_dict, stored)  # nn.Linear weights are (out, in) already

    ids = torch.randint(0, 501, (2, 40), generator=torch.Generator().manual_seed(1))
    rebuilt = hf_model_from_state_dict(ckpt.config, ckpt.state_dict)
    torch.testing.assert_close(rebuilt(ids).logits, nanogpt_reference_logits(path, ids), rtol=0, atol=1e-5)


def test_nanogpt_gpt2_vocab_gets_endoftext(tmp_path):
    path = make_nanogpt_checkpoint(
        tmp_path / "ckpt.pt", n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50304, bias=False
    )
    ckpt = load_checkpoint(path)
    assert ckpt.config.eos_token_id == ckpt.generation["eos_token_id"] == 50256


def test_nanogpt_without_model_args_is_an_error(tmp_path):
    torch.save({"model": {"transformer.wte.weight": torch.zeros(3, 4)}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"'model' \(state dict\) and 'model_args'.*found \['model'\]"):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_nanogpt_with_incomplete_model_args_is_an_error(tmp_path):
    torch.save({"model": {}, "model_args": {"n_layer": 1, "bias": True}}, tmp_path / "x.pth")
    lacks = r"model_args lacks \['n_head', 'n_embd', 'block_size', 'vocab_size'\]"
    with pytest.raises(ValueError, match=lacks):
        load_checkpoint(tmp_path / "x.pth")


def test_nanogpt_state_dict_mismatch_is_reported(tmp_path):
    path = make_nanogpt_checkpoint(
        tmp_path / "ckpt.pt", n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50, bias=True
    )
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"]["bias"] = False  # the file has biases the config now says do not exist
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"unexpected key 'h.0.attn.c_attn.bias' \(shape \(24,\)\)"):
        load_checkpoint(path)


# --- generation defaults ---------------------------------------------------------------------


def test_generation_defaults_from_config_json(tmp_path):
    model = make_hf_model(CONFIG.replace(eos_token_id=[3, 996], pad_token_id=7), seed=0)
    folder = save_hf_checkpoint(model, tmp_path / "m")
    (folder / "generation_config.json").unlink()
    ckpt = load_checkpoint(folder)
    assert ckpt.generation == {"bos_token_id": 996, "eos_token_id": [3, 996], "pad_token_id": 7}
    assert ckpt.config.eos_token_id == [3, 996] and ckpt.config.pad_token_id == 7


def test_generation_config_json_overrides_and_extends(hf_dir, tmp_path):
    cfg, sd = hf_folder_contents(hf_dir)
    folder = write_weights(tmp_path / "m", cfg, sd)
    settings = {
        "eos_token_id": [1, 2], "pad_token_id": 0, "do_sample": True, "top_k": 7, "top_p": 0.9,
        "temperature": 0.7, "max_length": 50, "max_new_tokens": 5, "repetition_penalty": 1.1,
    }  # fmt: skip
    metadata = {"transformers_version": "5.24.0", "_from_model_config": False}
    (folder / "generation_config.json").write_text(json.dumps({**settings, **metadata}))
    assert load_checkpoint(folder).generation == {"bos_token_id": 996, **settings}


def test_generation_defaults_of_a_live_model(hf_model):
    model = copy.deepcopy(hf_model)
    model.generation_config.top_k = 11
    model.generation_config.eos_token_id = [5, 6]
    gen = load_checkpoint(model).generation
    assert gen["top_k"] == 11 and gen["eos_token_id"] == [5, 6] and gen["bos_token_id"] == 996
    assert "transformers_version" not in gen and "_from_model_config" not in gen


# --- config mapping ----------------------------------------------------------------------------


def test_config_from_hf_maps_every_field():
    import transformers

    hf = transformers.GPT2Config(
        vocab_size=321, n_positions=77, n_embd=40, n_layer=5, n_head=5, n_inner=100,
        activation_function="relu", layer_norm_epsilon=1e-6, scale_attn_weights=False,
        scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=[2, 3], pad_token_id=4, reorder_and_upcast_attn=True, resid_pdrop=0.3,
    )  # fmt: skip
    for cfg in (hf, hf.to_dict()):
        c = config_from_hf(cfg)
        assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (321, 77, 40, 5, 5)
        assert (c.n_inner, c.activation, c.layer_norm_epsilon, c.bias) == (100, "relu", 1e-6, True)
        assert (c.scale_attn_weights, c.scale_attn_by_inverse_layer_idx) == (False, True)
        assert c.tie_word_embeddings is False
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, [2, 3], 4)


@pytest.mark.parametrize(
    "hf_name, ours", [("gelu_new", "gelu_tanh"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")]
)
def test_config_from_hf_activations(hf_name, ours):
    assert config_from_hf({"activation_function": hf_name}).activation == ours


def test_config_from_hf_defaults_are_gpt2_small():
    assert config_from_hf({}) == PRESETS["gpt2"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("activation_function", "swish", r"activation_function='swish' is not supported; supported: \["),
        ("add_cross_attention", True, r"add_cross_attention=True is not supported"),
        ("model_type", "gpt_neo", r"model_type='gpt_neo' is not supported"),
        ("n_embd", 61, r"n_embd \(61\) must be divisible by n_head \(6\)"),
    ],
)
def test_unsupported_config_is_an_error(hf_dir, tmp_path, field, value, message):
    cfg, sd = hf_folder_contents(hf_dir)
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        config_from_hf(cfg)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(write_weights(tmp_path / "m", cfg, sd))


# --- shape and key validation ------------------------------------------------------------------


def test_missing_wrong_shape_and_unexpected_keys_are_all_reported(hf_dir, tmp_path):
    cfg, sd = hf_folder_contents(hf_dir)
    del sd["transformer.h.1.ln_2.bias"]
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(60, 179)  # Conv1D (in, out)
    sd["transformer.h.2.mlp.c_fc.bias"] = torch.zeros(241)
    sd["transformer.h.0.attn.rotary.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError) as info:
        load_checkpoint(write_weights(tmp_path / "m", cfg, sd))
    msg = str(info.value)
    assert "missing key 'h.1.ln_2.bias' (expected shape (60,))" in msg
    assert "'h.0.attn.c_attn.weight': found shape (179, 60), expected (180, 60)" in msg
    assert "'h.2.mlp.c_fc.bias': found shape (241,), expected (240,)" in msg
    assert "unexpected key 'h.0.attn.rotary.weight' (shape (4, 4))" in msg
    assert "(out, in) layout" in msg and str(tmp_path / "m") in msg


def test_many_problems_are_capped(hf_dir, tmp_path):
    cfg, sd = hf_folder_contents(hf_dir)
    cfg["n_layer"] = 12  # the file has 3 layers: 9 * 12 missing keys
    with pytest.raises(ValueError) as info:
        load_checkpoint(write_weights(tmp_path / "m", cfg, sd))
    msg = str(info.value)
    assert msg.count("missing key") == 20
    assert re.search(r"\.\.\. and 88 more$", msg)


# --- files that are absent, malformed or unsafe ----------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_folder_without_config_or_ckpt(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no config.json.*no ckpt.pt.*\['notes.txt'\]"):
        load_checkpoint(tmp_path)


def test_folder_without_weights(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no weights .*'model.safetensors'.*found \['config.json'\]"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text, message", [("{not json", "malformed JSON"), ("[1, 2]", "must hold a JSON object, got a list")]
)
def test_malformed_config_json(hf_dir, tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


def test_shard_listed_in_index_but_absent(hf_model, tmp_path):
    folder = save_hf_checkpoint(hf_model, tmp_path / "m", sharded=True)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-0000.*does not exist"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("model.safetensors", b"\x00garbage" * 10, "could not read safetensors file"),
        ("pytorch_model.bin", b"\x00garbage" * 10, "refusing to load"),  # not a zip: read as a pickle
        ("pytorch_model.bin", b"PK\x03\x04" + b"\x00" * 40, "could not read .* as a torch checkpoint"),
        ("pytorch_model.bin", b"", "could not read .* as a torch checkpoint: EOFError"),
    ],
    ids=["safetensors", "bin-garbage", "bin-truncated-zip", "bin-empty"],
)
def test_corrupt_weights_file(hf_dir, tmp_path, name, content, message):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(tmp_path)
    assert name in str(info.value)


def test_a_weights_file_path_is_refused(hf_dir):
    with pytest.raises(ValueError, match="pass its folder"):
        load_checkpoint(hf_dir / "model.safetensors")


def test_unsupported_object():
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear"):
        load_checkpoint(torch.nn.Linear(2, 2))


class _Payload:
    """Pickles as a call to os.mkdir(marker): proof of code execution if it is ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("layout", ["hf-bin", "nanogpt"])
def test_malicious_pickle_is_refused_and_never_runs(hf_dir, tmp_path, layout):
    marker = tmp_path / "pwned"
    if layout == "hf-bin":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text((hf_dir / "config.json").read_text())
        path = tmp_path / "m" / "pytorch_model.bin"
        torch.save({"transformer.wte.weight": torch.zeros(2), "x": _Payload(marker)}, path)
        src = tmp_path / "m"
    else:
        path = src = tmp_path / "ckpt.pt"
        torch.save({"model": {}, "model_args": {}, "config": _Payload(marker)}, path)

    refused = r"refusing to load .*never runs code from a checkpoint.*posix.mkdir"
    with pytest.raises(ValueError, match=refused):
        load_checkpoint(src)
    assert not marker.exists(), "loading the checkpoint ran code from it"

    # The payload is live: an unsafe load does run it (so the check above can fail).
    torch.load(path, weights_only=False)
    assert marker.is_dir()

"""Checkpoint loading: every source becomes one `Checkpoint` in gptfast's layout.

Sources
-------
- a Hugging Face GPT-2 folder: ``config.json`` plus ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``
  (tried in that order, as transformers does);
- a live ``transformers`` ``GPT2LMHeadModel`` or ``GPT2Model`` (transformers is imported only
  in that case, and only by the caller);
- a nanoGPT checkpoint: a ``.pt``/``.pth`` file, or a folder holding ``ckpt.pt`` and no
  ``config.json``.

gptfast layout: HF GPT-2 parameter names without ``transformer.``, Linear weights
``(out_features, in_features)`` (HF's Conv1D stores ``(in, out)``, so those are transposed;
nanoGPT's ``nn.Linear`` already is ``(out, in)``), dtypes as stored. A tied head is not stored.

Pickled files (``.bin``, ``.pt``) are read with ``torch.load(weights_only=True)``: a checkpoint
can hold tensors and plain containers, never code that runs on load.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch

from .config import ACTIVATIONS, GPT2Config
from .tokenizer import has_tokenizer_files

# HF GPT-2's Conv1D modules store weight (in, out); gptfast's Linear layout is (out, in).
_CONV1D_WEIGHT = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Causal-mask buffers older HF and non-flash nanoGPT checkpoints store: not parameters.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# generation_config.json bookkeeping that is not a generation setting.
_GENERATION_METADATA = ("transformers_version",)
_MAX_REPORTED_PROBLEMS = 20

# Weight files of an HF folder, in transformers' order of preference.
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class Checkpoint:
    """A loaded checkpoint in gptfast's layout.

    Attributes
    ----------
    config : GPT2Config
        The model's shape and math (from ``config.json`` or nanoGPT's ``model_args``).
    state_dict : dict[str, torch.Tensor]
        Exactly the keys and shapes of ``config.param_shapes()``; dtypes as stored, on the CPU
        (a live model's tensors stay where they were).
    generation : dict
        Generation defaults: ``bos_token_id``, ``eos_token_id`` (int or list), ``pad_token_id``
        from the model config, overridden and extended by ``generation_config.json``
        (``do_sample``, ``top_k``, ``top_p``, ``temperature``, ``max_length``, ...).
    source : str
        What was loaded, for messages.
    tokenizer_dir : Path or None
        The checkpoint's folder when it holds tokenizer files.
    """

    config: GPT2Config
    state_dict: dict[str, torch.Tensor]
    generation: dict
    source: str
    tokenizer_dir: Path | None = None


def load_checkpoint(src, check_values: bool = True) -> Checkpoint:
    """Load GPT-2 weights from an HF folder, a live transformers model or a nanoGPT file.

    Parameters
    ----------
    src : str, Path, transformers.GPT2LMHeadModel or transformers.GPT2Model
        See the module docstring for the accepted sources.
    check_values : bool
        Refuse weights that are not floating point or hold NaN or infinity, naming the first
        such tensor (one pass over the weights). False loads them as they are.

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        `src` does not exist (or is a broken symbolic link), or the folder holds no weights file.
    ValueError
        The config asks for something gptfast does not compute or for more parameters than the
        checkpoint stores (checked before anything is allocated), a file is a directory, a named
        pipe or a symbolic link loop, a shard path leaves the folder, a weights file is
        unreadable or holds more than tensors, keys/shapes do not match the config (every
        problem is listed), or (with `check_values`) a weight is not finite or not floating point.

    Examples
    --------
    >>> ckpt = load_checkpoint("checkpoints/gpt2")
    >>> ckpt.state_dict["h.0.attn.c_attn.weight"].shape  # (3 * n_embd, n_embd)
    torch.Size([2304, 768])
    """
    ckpt = _load(src)
    if check_values:
        _check_values(ckpt.state_dict, ckpt.source)
    return ckpt


def _load(src) -> Checkpoint:
    if isinstance(src, (str, Path)):
        path = Path(src)
        if path.is_dir():
            if os.path.lexists(path / "config.json"):
                return _load_hf_folder(path)
            if os.path.lexists(path / "ckpt.pt"):
                return _load_nanogpt(path / "ckpt.pt")
            raise FileNotFoundError(
                f"{str(path)!r} is neither an HF checkpoint folder (no config.json) nor a nanoGPT "
                f"folder (no ckpt.pt); it holds {sorted(p.name for p in path.iterdir())}"
            )
        _require_file(path, "checkpoint")
        if path.suffix in (".pt", ".pth"):
            return _load_nanogpt(path)
        raise ValueError(
            f"cannot load {str(path)!r}: a file must be a nanoGPT checkpoint ending in .pt or .pth; "
            f"for a Hugging Face checkpoint pass its folder (the one holding config.json)"
        )
    module = type(src).__module__
    if module.startswith("transformers.") and type(src).__name__ in ("GPT2LMHeadModel", "GPT2Model"):
        return _load_hf_model(src)
    raise TypeError(
        f"cannot load a checkpoint from a {module}.{type(src).__qualname__}; expected a path "
        f"(HF folder or nanoGPT .pt file) or a transformers GPT2LMHeadModel / GPT2Model"
    )


def config_from_hf(cfg) -> GPT2Config:
    """Map an HF GPT-2 config (a ``config.json`` dict or a transformers config) to `GPT2Config`.

    Fields that change the math are honoured or rejected with a ValueError naming the field and
    its value; dropout and training-only fields do not matter at inference. Missing fields
    take transformers' GPT-2 defaults.

    Examples
    --------
    >>> config_from_hf({"n_embd": 768, "n_layer": 12, "n_head": 12}).head_dim
    64
    """
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    model_type = cfg.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(
            f"config model_type={model_type!r} is not supported: gptfast runs 'gpt2' models only"
        )
    if cfg.get("add_cross_attention", False):
        raise ValueError("config add_cross_attention=True is not supported: gptfast runs decoder-only GPT-2")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"config activation_function={act!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    # reorder_and_upcast_attn only changes how HF avoids fp16 overflow in the scores; gptfast
    # always computes the attention softmax in fp32, so it needs no flag.
    # HF GPT-2 has Linear and LayerNorm biases always, so `bias` keeps its default True.
    return GPT2Config(
        vocab_size=cfg.get("vocab_size", 50257),
        n_positions=cfg.get("n_positions", 1024),
        n_embd=cfg.get("n_embd", 768),
        n_layer=cfg.get("n_layer", 12),
        n_head=cfg.get("n_head", 12),
        n_inner=cfg.get("n_inner"),
        activation=ACTIVATIONS[act],
        layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
        scale_attn_weights=cfg.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=cfg.get("scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=cfg.get("bos_token_id", 50256),
        eos_token_id=cfg.get("eos_token_id", 50256),
        pad_token_id=cfg.get("pad_token_id"),
    )


# --- sources -------------------------------------------------------------------------------


def _load_hf_folder(folder: Path) -> Checkpoint:
    cfg = _read_json(folder / "config.json")
    config = config_from_hf(cfg)
    generation = _generation_defaults(cfg)
    if os.path.lexists(folder / "generation_config.json"):
        generation.update(_generation_overrides(_read_json(folder / "generation_config.json")))

    weights = next((folder / n for n in _HF_WEIGHT_FILES if os.path.lexists(folder / n)), None)
    if weights is None:
        raise FileNotFoundError(
            f"no weights in HF checkpoint folder {str(folder)!r}: expected one of {list(_HF_WEIGHT_FILES)}; "
            f"found {sorted(p.name for p in folder.iterdir())}"
        )
    if weights.name.endswith(".index.json"):
        index = _read_json(weights)
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{str(weights)!r} has no 'weight_map' object")
        shards = sorted(set(map(str, index["weight_map"].values())))
        for shard in shards:
            # NOTE: checked by name, not by resolving links: HF's cache folders link each file
            # to a blob outside the snapshot folder, which is fine; a name that climbs out is not.
            if PurePath(shard).is_absolute() or ".." in PurePath(shard).parts or not shard:
                raise ValueError(f"{str(weights)!r} lists shard {shard!r}, a path outside the "
                                 f"checkpoint folder; shards must be file names inside {str(folder)!r}")
        raw = {}
        for shard in shards:
            raw.update(_read_tensor_file(folder / shard))
    else:
        raw = _read_tensor_file(weights)

    source = f"HF checkpoint {folder} ({weights.name})"
    config, state_dict = _from_hf_names(raw, config, source)
    tokenizer_dir = folder if has_tokenizer_files(folder) else None
    return Checkpoint(config, state_dict, generation, source, tokenizer_dir)


def _load_hf_model(model) -> Checkpoint:
    config = config_from_hf(model.config)
    generation = _generation_defaults(model.config.to_dict())
    if getattr(model, "generation_config", None) is not None:
        generation.update(_generation_overrides(model.generation_config.to_diff_dict()))
    source = f"transformers {type(model).__name__} object"
    raw = {k: v.detach() for k, v in model.state_dict().items()}
    config, state_dict = _from_hf_names(raw, config, source)
    # A model loaded with from_pretrained(folder) remembers the folder; its tokenizer is there.
    name = str(getattr(model, "name_or_path", "") or "")
    tokenizer_dir = Path(name) if name and Path(name).is_dir() and has_tokenizer_files(name) else None
    return Checkpoint(config, state_dict, generation, source, tokenizer_dir)


def _load_nanogpt(path: Path) -> Checkpoint:
    source = f"nanoGPT checkpoint {path}"
    ckpt = _torch_load(path)
    if not (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("model"), dict)
        and isinstance(ckpt.get("model_args"), dict)
    ):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{source}: expected a dict with 'model' (state dict) and 'model_args' (dict), as "
            f"nanoGPT's train.py saves; found {found}"
        )
    args = ckpt["model_args"]
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise ValueError(f"{source}: model_args lacks {missing}; it has {sorted(args)}")
    not_tensors = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: 'model' must map names to tensors; not tensors: {not_tensors[:5]}")
    vocab_size = args["vocab_size"]
    # nanoGPT trains on GPT-2's BPE, whose <|endoftext|> (50256) separates documents; a
    # vocabulary without that id (e.g. a character-level model) has no end-of-text token.
    eot = 50256 if isinstance(vocab_size, int) and vocab_size > 50256 else None
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args["block_size"],
        n_embd=args["n_embd"],
        n_layer=args["n_layer"],
        n_head=args["n_head"],
        activation="gelu",  # nanoGPT's nn.GELU() is the exact erf form
        bias=bool(args.get("bias", True)),
        tie_word_embeddings=True,  # nanoGPT ties wte and lm_head
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=None,
    )
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}
    raw = {}
    for key, value in ckpt["model"].items():
        # torch.compile wraps the module; nanoGPT saves the wrapper's state dict as is.
        key = key.removeprefix("_orig_mod.").removeprefix("transformer.")
        if not _MASK_BUFFER.fullmatch(key):
            raw[key] = value
    config, state_dict = _resolve_head(raw, config)
    _validate(state_dict, config, source)
    tokenizer_dir = path.parent if has_tokenizer_files(path.parent) else None
    return Checkpoint(config, state_dict, generation, source, tokenizer_dir)


# --- shared steps --------------------------------------------------------------------------


def _from_hf_names(raw: dict, config: GPT2Config, source: str) -> tuple[GPT2Config, dict]:
    """HF names and layout -> gptfast's, then validate against the config."""
    state_dict = {}
    for key, value in raw.items():
        key = key.removeprefix("transformer.")
        if _MASK_BUFFER.fullmatch(key):
            continue
        if _CONV1D_WEIGHT.fullmatch(key) and value.ndim == 2:
            value = value.t().contiguous()  # Conv1D (in, out) -> (out, in)
        state_dict[key] = value
    config, state_dict = _resolve_head(state_dict, config)
    _validate(state_dict, config, source, hf_layout=True)
    return config, state_dict


def _resolve_head(state_dict: dict, config: GPT2Config) -> tuple[GPT2Config, dict]:
    """Drop a stored lm_head that equals wte (tied); keep one that differs (untied).

    A distinct stored head is kept even when the config says tie_word_embeddings=True: that
    is what transformers 5 computes (it warns and leaves such a head untied).
    """
    head, wte = state_dict.get("lm_head.weight"), state_dict.get("wte.weight")
    if head is None or wte is None:
        return config, state_dict
    if head.shape == wte.shape and head.dtype == wte.dtype and torch.equal(head, wte):
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        return config.replace(tie_word_embeddings=True), state_dict
    if config.tie_word_embeddings:
        warnings.warn(
            "the config ties lm_head to wte (tie_word_embeddings=True) but the checkpoint stores a "
            "different lm_head.weight; using the stored head untied, as transformers does",
            UserWarning,
            stacklevel=3,
        )
    return config.replace(tie_word_embeddings=False), state_dict


def _validate(state_dict: dict, config: GPT2Config, source: str, hf_layout: bool = False) -> None:
    # NOTE: sized in closed form first: a config far larger than the weights (n_layer 10^6) fails
    # before a table of its parameters is built or anything is allocated for it; a near miss
    # gets the itemised list below.
    need, stored = config.num_params(), sum(t.numel() for t in state_dict.values())
    per_layer = 12 if config.bias else 6
    tensors = 2 + config.n_layer * per_layer + (2 if config.bias else 1) + (not config.tie_word_embeddings)
    if need > stored and tensors - len(state_dict) > 10 * _MAX_REPORTED_PROBLEMS:
        raise ValueError(
            f"{source}: its config describes a model of {need:,} parameters (n_layer={config.n_layer}, "
            f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, n_positions="
            f"{config.n_positions}; {4 * need / 2**30:.1f} GiB in fp32) but the checkpoint stores "
            f"only {stored:,} values; the config does not match the weights"
        )
    expected = config.param_shapes()
    problems = []
    for key, shape in expected.items():
        if key not in state_dict:
            problems.append(f"missing key {key!r} (expected shape {shape})")
        elif tuple(state_dict[key].shape) != shape:
            found = tuple(state_dict[key].shape)
            problems.append(f"{key!r}: found shape {found}, expected {shape}")
    for key in state_dict:
        if key not in expected:
            problems.append(f"unexpected key {key!r} (shape {tuple(state_dict[key].shape)})")
    if not problems:
        return
    shown = problems[:_MAX_REPORTED_PROBLEMS]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    layout = " (shapes in (out, in) layout, after transposing HF Conv1D weights)" if hf_layout else ""
    raise ValueError(
        f"{source} does not match its config ({config.n_layer} layers, n_embd={config.n_embd}, "
        f"vocab_size={config.vocab_size}, bias={config.bias}){layout}:\n  " + "\n  ".join(shown)
    )


def _generation_defaults(cfg: dict) -> dict:
    return {
        "bos_token_id": cfg.get("bos_token_id", 50256),
        "eos_token_id": cfg.get("eos_token_id", 50256),
        "pad_token_id": cfg.get("pad_token_id"),
    }


def _generation_overrides(gen: dict) -> dict:
    return {k: v for k, v in gen.items() if not k.startswith("_") and k not in _GENERATION_METADATA}


# --- files ---------------------------------------------------------------------------------


def _check_values(state_dict: dict, source: str) -> None:
    """Every weight floating point and finite, else a ValueError naming the first bad tensor."""
    for key, t in state_dict.items():
        if not t.is_floating_point():
            raise ValueError(f"{source}: weight {key!r} has dtype {t.dtype}; GPT-2 weights are "
                             f"floating point (load_checkpoint(..., check_values=False) loads it "
                             f"anyway)")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            first = tuple(int(i) for i in (~finite).nonzero()[0])
            raise ValueError(f"{source}: weight {key!r} holds {bad} NaN or infinite value(s), the "
                             f"first at index {first} ({t[first].item()}); pass "
                             f"check_values=False to load_checkpoint to load it anyway")


def _file_problem(path: Path) -> tuple[type, str] | None:
    """Why `path` cannot be read as a regular file (the exception class and the reason), or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return ValueError, "is a symbolic link loop (following it never reaches a file)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                return FileNotFoundError, f"is a broken symbolic link (to {os.readlink(path)!r})"
            return FileNotFoundError, "does not exist"
        return ValueError, f"cannot be read: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return ValueError, "is a directory, not a file"
    if stat.S_ISFIFO(st.st_mode):
        return ValueError, "is a named pipe (FIFO), not a regular file (reading it would wait for a writer)"
    if not stat.S_ISREG(st.st_mode):
        return ValueError, "is not a regular file (a socket or a device)"
    return None


def _require_file(path: Path, what: str) -> None:
    problem = _file_problem(path)
    if problem is not None:
        cls, why = problem
        raise cls(f"{what} {str(path)!r} {why}")


def _read_json(path: Path) -> dict:
    _require_file(path, "JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON in {str(path)!r}: {e}") from e
    except RecursionError:
        raise ValueError(f"the JSON in {str(path)!r} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got a {type(data).__name__}")
    return data


def _read_tensor_file(path: Path) -> dict:
    _require_file(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"could not read safetensors file {str(path)!r}: {e}") from e
    state_dict = _torch_load(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{str(path)!r} must hold a dict of tensors, got {type(state_dict).__name__}")
    return state_dict


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with generic advice to retry with weights_only=False (never do
        # that here); keep only its specific lines, e.g. which global was blocked.
        detail = [
            line.removeprefix("Please file an issue with the following so that we can make "
                              "`weights_only=True` compatible with your use case: ")
            for line in str(e).splitlines()[1:]
            if line.strip() and not line.startswith("Check the documentation")
        ]
        raise ValueError(
            f"refusing to load {str(path)!r}: gptfast reads pickled checkpoints with "
            f"torch.load(weights_only=True), which accepts only tensors and plain containers, and "
            f"never runs code from a checkpoint; this file holds something else or is corrupt "
            f"({' '.join(detail) or 'no detail'})"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(
            f"could not read {str(path)!r} as a torch checkpoint: {type(e).__name__}: {e}"
        ) from e

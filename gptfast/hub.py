"""Hugging Face hub names ("gpt2", "openai-community/gpt2-medium") as checkpoint sources.

A name that is not an existing path and reads like a hub repository id resolves the way
`transformers.GPT2LMHeadModel.from_pretrained(name)` does: through the local Hugging Face cache
(`huggingface_hub.snapshot_download`), downloading the files gptfast reads where the machine can
reach the hub, the cached snapshot where it cannot (or with `HF_HUB_OFFLINE=1`). Only weights,
configs and tokenizer files are fetched (safetensors first, the pickled `.bin` only when a
repository has no safetensors), never TensorFlow/Flax/ONNX files.
"""

from __future__ import annotations

import re
from pathlib import Path

# A hub id is `name` or `namespace/name`; names hold letters, digits, "-", "_" and ".".
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# Names ending like this are files someone meant to pass, not repositories.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json")

_CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "special_tokens_map.json"]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_PICKLED = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def is_hub_id(src) -> bool:
    """Whether `src` is a string that names a hub repository rather than a local path.

    An existing path always wins; so does anything written like a path (a leading "/", "./",
    "~", more than one "/") or a file name (".pt", ".bin", ".safetensors", ".json").

    Examples
    --------
    >>> is_hub_id("gpt2"), is_hub_id("openai-community/gpt2"), is_hub_id("out/ckpt.pt")
    (True, True, False)
    """
    if not isinstance(src, str) or Path(src).exists():
        return False
    return bool(_REPO_ID.fullmatch(src)) and not src.endswith(_FILE_SUFFIXES) and ".." not in src


def cache_dir() -> Path:
    """The Hugging Face hub cache folder in force (HF_HUB_CACHE, HF_HOME/hub, or the default)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder holding `repo_id`'s weights, config and tokenizer files.

    Parameters
    ----------
    repo_id : str
        A hub repository id, e.g. "gpt2" or "openai-community/gpt2".
    revision : str, optional
        A branch, tag or commit; default the repository's main branch.

    Returns
    -------
    Path
        The snapshot folder in the Hugging Face cache (an HF checkpoint folder).

    Raises
    ------
    FileNotFoundError
        The repository is neither in the local cache nor downloadable here; the message names the
        cache folder, the reason, and how to get the files.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_CONFIG_FILES + _SAFETENSORS))
        if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_CONFIG_FILES + _PICKLED))
    # offline and not cached (an OSError), unknown or gated repository, no such revision, a bad id
    except (OSError, ValueError, HfHubHTTPError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and the Hugging Face model {repo_id!r} is not in the cache "
            f"({cache_dir()}) and could not be downloaded ({type(exc).__name__}: {reason[:200]}); "
            f"download it where the hub is reachable (e.g. `hf download {repo_id}`) into that "
            f"cache, or pass a checkpoint folder"
        ) from exc
    return folder

"""gptfast: fast GPT-2 generation, a drop-in for Hugging Face's `GPT2LMHeadModel.generate()`.

>>> import gptfast
>>> model = gptfast.GPT2.from_pretrained("path/to/gpt2")  # HF folder, HF model or nanoGPT ckpt
>>> out = gptfast.generate(model, input_ids, attention_mask, max_new_tokens=32)

The heavy parts (torch, the model, the engine) load on first use, so `import gptfast` and
`gptfast --help` stay instant. (`generate()` lives in `gptfast/generation.py`: a submodule named
`generate` would shadow the function `gptfast.generate` once imported.)
"""

import importlib

from .config import PRESETS, GPT2Config, get_config

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access
_LAZY = {
    "GPT2": "model",
    "generate": "generation",
    "GenerateOutput": "generation",
    "patch_hf_generate": "generation",
    "unpatch_hf_generate": "generation",
    "Engine": "engine",
    "SamplingParams": "sequence",
}

__all__ = ["GPT2", "GPT2Config", "PRESETS", "get_config", "generate", "GenerateOutput", "Engine",
           "SamplingParams", "patch_hf_generate", "unpatch_hf_generate", "__version__"]


_SUBMODULES = {"model", "engine", "generation", "hf_convert", "kv_cache",
               "weights", "tokenizer", "hub", "ops", "bench", "cli"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

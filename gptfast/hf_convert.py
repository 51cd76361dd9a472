"""A transformers `GPT2LMHeadModel` handed to `generate()`: converted once into a gptfast `GPT2`.

The conversion (same device and dtype) is cached per HF object and made again when the HF
model's weights change: a replaced, moved, cast or in-place modified parameter changes their
fingerprint (`gptfast.engine.weights_fingerprint`). Writes through `.data` bypass PyTorch's
version counters: after one, `forget_conversion` drops the cached copy.
"""

from __future__ import annotations

import threading
import weakref

from .engine import weights_fingerprint
from .model import GPT2

# transformers models converted once, keyed by the HF object, with the fingerprint of the
# weights they were converted from. The lock makes threads' first calls share one conversion.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONVERTING = threading.Lock()


def as_gptfast(model) -> tuple[GPT2, dict | None]:
    """The gptfast model to run for `model`, and the HF generation defaults to use.

    Parameters
    ----------
    model : gptfast.GPT2 or transformers.GPT2LMHeadModel

    Returns
    -------
    (GPT2, dict or None)
        A gptfast model is returned as is, with None (its own `generation_defaults` apply). An
        HF model's cached conversion comes with its generation defaults, read from its
        `generation_config` on every call, as HF does.
    """
    if isinstance(model, GPT2):
        return model, None
    cls = type(model)
    if not (cls.__module__.startswith("transformers") and hasattr(model, "config")):
        raise TypeError(f"model must be a gptfast.GPT2 or a transformers GPT2LMHeadModel, "
                        f"got {cls.__module__}.{cls.__name__}")
    if getattr(model.config, "model_type", None) != "gpt2":
        raise ValueError(f"gptfast runs GPT-2 models only; got a transformers "
                         f"{cls.__name__} with model_type={model.config.model_type!r}")
    if not hasattr(model, "lm_head"):
        raise TypeError(f"a transformers {cls.__name__} has no language-model head; pass a "
                        f"GPT2LMHeadModel")
    converted = _converted(model)
    defaults = dict(converted.generation_defaults)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_diff_dict"):
        defaults.update({k: v for k, v in gen.to_diff_dict().items() if not k.startswith("_")})
    return converted, defaults


def _converted(hf_model) -> GPT2:
    """The cached conversion of `hf_model`, made (again) when its weights changed."""
    with _CONVERTING:
        fingerprint = weights_fingerprint(hf_model)
        entry = _CONVERTED.get(hf_model)
        if entry is None or fingerprint is None or entry[1] != fingerprint:
            p = next(hf_model.parameters())
            entry = (GPT2.from_pretrained(hf_model, dtype=p.dtype, device=p.device), fingerprint)
            _CONVERTED[hf_model] = entry
        return entry[0]


def forget_conversion(hf_model) -> None:
    """Drop the cached gptfast conversion of `hf_model`: the next call converts it afresh. Needed
    only after writes that PyTorch's version counters do not see (through `.data`)."""
    _CONVERTED.pop(hf_model, None)

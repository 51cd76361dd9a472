"""GPT-2 configuration: one dataclass, the four released shapes and small shapes for tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Activation names as they appear in HF `config.json` -> the function gptfast computes.
# HF GPT-2 uses the tanh approximation ("gelu_new"); nanoGPT uses exact erf GELU.
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # same tanh formula, written differently
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # GPT-2 BPE vocabulary (not a multiple of 64)
    n_positions: int = 1024  # learned position embeddings: the longest sequence
    n_embd: int = 768  # model width C
    n_layer: int = 12
    n_head: int = 12  # head_dim = n_embd // n_head
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation: str = "gelu_tanh"  # "gelu_tanh" (HF GPT-2), "gelu" (exact, nanoGPT) or "relu"
    layer_norm_epsilon: float = 1e-5
    bias: bool = True  # False: no Linear or LayerNorm biases (nanoGPT bias=False)
    scale_attn_weights: bool = True  # scores scaled by 1/sqrt(head_dim) (HF's default)
    scale_attn_by_inverse_layer_idx: bool = False  # extra 1/(layer_idx+1) on attention scores
    tie_word_embeddings: bool = True  # lm_head shares wte's weight
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        # NOTE: bool is an int subclass: `"n_layer": true` in a config.json must not mean 1.
        def integer(value):
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not integer(value) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None and (not integer(self.n_inner) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be a positive int or None, got {self.n_inner!r}")
        if self.activation not in ("gelu_tanh", "gelu", "relu"):
            raise ValueError(
                f"GPT2Config.activation must be 'gelu_tanh', 'gelu' or 'relu', got {self.activation!r}"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a float > 0, got {eps!r}")
        for name in ("bias", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                     "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPT2Config.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(integer(t) and t >= 0 for t in ids):
                allowed = "a token id, a list of them" if name == "eos_token_id" else "a token id"
                raise ValueError(f"GPT2Config.{name} must be {allowed} or None, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter gptfast's `GPT2` holds, by name, with its shape.

        Names follow HF's GPT-2 without the `transformer.` prefix; Linear weights are
        stored `(out_features, in_features)` (HF's Conv1D weights are the transpose).
        """
        C, F, V = self.n_embd, self.mlp_dim, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (V, C),
            "wpe.weight": (self.n_positions, C),
        }

        def layer_norm(prefix):
            shapes[f"{prefix}.weight"] = (C,)
            if self.bias:
                shapes[f"{prefix}.bias"] = (C,)

        def linear(prefix, n_out, n_in):
            shapes[f"{prefix}.weight"] = (n_out, n_in)
            if self.bias:
                shapes[f"{prefix}.bias"] = (n_out,)

        for i in range(self.n_layer):
            layer_norm(f"h.{i}.ln_1")
            linear(f"h.{i}.attn.c_attn", 3 * C, C)
            linear(f"h.{i}.attn.c_proj", C, C)
            layer_norm(f"h.{i}.ln_2")
            linear(f"h.{i}.mlp.c_fc", F, C)
            linear(f"h.{i}.mlp.c_proj", C, F)
        layer_norm("ln_f")
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        return shapes

    def num_params(self) -> int:
        """Parameters of the model, computed in closed form (no table of shapes is built, so an
        absurd config is cheap to size)."""
        C, F, V, L = self.n_embd, self.mlp_dim, self.vocab_size, self.n_layer
        bias = 1 if self.bias else 0
        per_layer = (2 * C * (1 + bias)  # ln_1, ln_2
                     + 3 * C * C + 3 * C * bias + C * C + C * bias  # c_attn, attn c_proj
                     + F * C + F * bias + C * F + C * bias)  # c_fc, mlp c_proj
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + self.n_positions * C + L * per_layer + C * (1 + bias) + head


PRESETS: dict[str, GPT2Config] = {
    # The released GPT-2 shapes, exactly as HF's configs give them.
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    # Small shapes for tests: odd head counts, a vocabulary that is not a multiple of 64,
    # a short context.
    "tiny": GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                       bos_token_id=999, eos_token_id=999),
    "tiny-odd": GPT2Config(vocab_size=997, n_positions=96, n_embd=60, n_layer=3, n_head=6,
                           bos_token_id=996, eos_token_id=996),
}


def get_config(name: str) -> GPT2Config:
    """The preset called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown GPT-2 preset {name!r}; known presets: {sorted(PRESETS)}") from None

"""The GPT-2 module: embeddings, pre-LN blocks, final LayerNorm, tied head.

Two forward paths share the weights:

- `GPT2.forward(input_ids, attention_mask)`: dense, like HF's `GPT2LMHeadModel.forward`, for
  scoring a padded batch (logits for every position).
- `GPT2.forward_paged(tokens, positions, meta, logits_indices)`: the generation path. Tokens of
  all sequences are flattened into one ragged batch (no padding); K/V live in the paged cache
  (`kv_cache.py`). The step is written once, as stages over the layers (`_Stages.run`); the ops
  that implement them are chosen by the backend: fused Triton GEMV kernels for small decode
  steps on the kernel path, Triton with cuBLAS GEMMs for the other steps there, the modules' own
  ops and the ops' eager references elsewhere (the CPU).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, quant
from .config import GPT2Config, get_config
from .kv_cache import AttnMetadata, KVCache

_KV_CACHE_LOCK = threading.Lock()

if TYPE_CHECKING:
    from .weights import Checkpoint


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, holder) -> torch.Tensor:
    """`F.linear(x, w, b)` as the model runs it: on the CPU through `ops.packed_linear` (oneDNN's
    linear on a prepacked copy of `w`, kept on `holder._packed`, where that is faster). When
    `holder._quantize` is "int8", the matmul runs on the holder's int8 copy of `w`
    (`gptfast.quant`), which follows `w` the same way (address, dtype, version counter)."""
    if holder._quantize is not None:
        q = quant.int8_weight(holder, w)
        if x.device.type == "cpu" and not ops.use_triton(x):
            return quant.int8_linear_cpu(x, q, b)
        return ops.int8_linear(x, q.int8(), q.scale, b)
    if w.device.type == "cpu":
        return ops.packed_linear.packed_linear(x, w, b, holder)
    return F.linear(x, w, b)


class _PackedHolder:
    _packed: tuple | None = None
    _quantize: str | None = None  # "int8": the matmul runs on `_int8`
    _int8 = None  # gptfast.quant.Int8Weight


class _WeightsCounter:
    """The number `GPT2.weights_version` reads, one per model, shared by all its modules."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class _Counted:
    """Base of gptfast's module classes: registering a parameter or a submodule on one of them
    (`module.weight = nn.Parameter(...)`, `load_state_dict(..., assign=True)`, `block.mlp = MLP(...)`)
    bumps the owning model's weights version. The decode graphs hold the parameters' addresses,
    and a live engine compares this number each step instead of the addresses."""

    _weights_counter: _WeightsCounter | None = None  # set by the owning GPT2

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        self._bump_weights_version()

    def add_module(self, name: str, module) -> None:
        super().add_module(name, module)
        self._bump_weights_version(module)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            self._bump_weights_version(value)

    def _bump_weights_version(self, module: nn.Module | None = None) -> None:
        counter = self._weights_counter
        if counter is not None:
            if module is not None:
                _share_counter(module, counter)
            counter.value += 1


def _share_counter(module: nn.Module, counter: _WeightsCounter) -> None:
    """Make every gptfast module under `module` count into `counter`."""
    for m in module.modules():
        if isinstance(m, _Counted):
            object.__setattr__(m, "_weights_counter", counter)


class LayerNorm(_Counted, nn.LayerNorm):
    """nn.LayerNorm whose parameter registrations count in the model's weights version."""


class Embedding(_Counted, nn.Embedding):
    """nn.Embedding whose parameter registrations count in the model's weights version."""


class ModuleList(_Counted, nn.ModuleList):
    """nn.ModuleList whose module registrations count in the model's weights version."""


class OutputHead(_Counted, nn.Linear):
    """An untied head's parameters (an nn.Linear that counts in the model's weights version);
    `GPT2` runs its matmul through `linear` with the head's own holder."""


class Linear(_Counted, nn.Linear):
    """nn.Linear through `linear` (prepacked weights on the CPU, `ops.packed_linear`; int8 copies
    when the model is quantised)."""

    _packed: tuple | None = None
    _quantize: str | None = None
    _int8 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self)


def _activation(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return F.relu


def _activation_(name: str, h: torch.Tensor) -> torch.Tensor:
    """The activation `name` (see `_activation`) on `h`, in place."""
    if name == "relu":
        return torch.relu_(h)
    return torch._C._nn.gelu_(h, approximate="tanh" if name == "gelu_tanh" else "none")


# `GPT2._decode_cpu` gathers every layer's cached K/V once per step while the copy takes at most
# this much (GPT-2 124M in fp32: 8 rows of 64 tokens take 38 MB), else layer by layer.
_STEP_GATHER_BYTES = 64 << 20


def _plain_decode(meta: AttnMetadata) -> bool:
    """Whether every row of a CPU decode step writes a slot and attends to at least one key (the
    static runner's padding rows do neither; they take the general path). A step on the Triton
    ops (CUDA, the CPU under Triton's interpreter with the "triton" backend, or CPU tensors standing
    in for CUDA ones as `gptfast kernels` traces a step) is not a CPU step: it takes the op set a
    CUDA device runs."""
    slots = meta.slot_mapping
    return (not ops.on_cuda(slots.device) and not ops.use_triton(slots) and bool((slots >= 0).all())
            and bool((meta.seq_lens > 0).all()))


class Attention(_Counted, nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        C = config.n_embd
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Linear(C, 3 * C, bias=config.bias)
        self.c_proj = Linear(C, C, bias=config.bias)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dense attention. x: (B, T, C); mask: (B, 1, T, T) bool, True = may attend."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)



class MLP(_Counted, nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_dim, bias=config.bias)
        self.c_proj = Linear(config.mlp_dim, config.n_embd, bias=config.bias)
        self.act = _activation(config.activation)
        self.gelu_tanh = config.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))

class Block(_Counted, nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

class GPT2(_Counted, nn.Module):
    """GPT-2 language model (HF `GPT2LMHeadModel` math) with a paged KV cache.

    Parameters
    ----------
    config : GPT2Config
    block_size : int
        Tokens per KV-cache block (default 16).
    num_kv_blocks : int or None
        KV-cache blocks in the pool, the reserved null block included. None picks a default
        for the device when the cache is first used (see `kv_cache.default_num_blocks`).

    Examples
    --------
    >>> import gptfast
    >>> model = gptfast.GPT2.from_config(gptfast.get_config("tiny"), seed=0)
    >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape
    torch.Size([1, 7])
    """

    def __init__(self, config: GPT2Config, block_size: int = 16, num_kv_blocks: int | None = None):
        super().__init__()
        if not isinstance(block_size, int) or not 1 <= block_size <= 1024:
            raise ValueError(f"block_size must be an int in [1, 1024], got {block_size!r}")
        if num_kv_blocks is not None and (not isinstance(num_kv_blocks, int) or num_kv_blocks < 2):
            raise ValueError(f"num_kv_blocks must be an int >= 2 (block 0 is reserved) or None, "
                             f"got {num_kv_blocks!r}")
        self.config = config
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.wpe = Embedding(config.n_positions, config.n_embd)
        self.h = ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        if not config.tie_word_embeddings:
            self.lm_head = OutputHead(config.n_embd, config.vocab_size, bias=False)
        self.generation_defaults: dict = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
        self._kv_cache: KVCache | None = None
        self._graph_runner = None  # (fingerprint, gptfast.graphs.DecodeGraphRunner)
        self._head = _PackedHolder()  # the head's prepacked or int8 weight (see `linear`)
        self.quantize: str | None = None  # see `quantize_weights`
        _share_counter(self, _WeightsCounter())
        self.eval()
        self.requires_grad_(False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: GPT2Config | str, seed: int | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    block_size: int = 16, num_kv_blocks: int | None = None,
                    progress: bool = False, quantize: str | None = None) -> "GPT2":
        """A randomly initialised model.

        Parameters
        ----------
        config : GPT2Config or str
            A config or a preset name (see `gptfast.PRESETS`).
        seed : int or None
            Makes the weights reproducible without touching torch's global RNG; None draws one
            from torch's global RNG.
        dtype, device, block_size, num_kv_blocks :
            As for `from_pretrained`.
        progress : bool
            Show a progress bar.
        quantize : None or "int8"
            As for `from_pretrained`.

        Returns
        -------
        GPT2 with GPT-2's initialisation: N(0, 0.02) weights, residual projections scaled by
        1/sqrt(2 * n_layer), zero biases, unit LayerNorm weights.
        """
        if isinstance(config, str):
            config = get_config(config)
        _check_dtype(dtype)
        quant.check_mode(quantize)
        with torch.inference_mode(False):  # real parameters even when called in inference mode
            model = cls._random(config, seed, dtype, device, block_size, num_kv_blocks, progress)
        return model.quantize_weights(quantize)

    @classmethod
    def _random(cls, config, seed, dtype, device, block_size, num_kv_blocks, progress) -> "GPT2":
        model = cls(config, block_size=block_size, num_kv_blocks=num_kv_blocks)
        gen = torch.Generator().manual_seed(seed if seed is not None else
                                            int(torch.randint(0, 2**62, ()).item()))
        with torch.no_grad():
            named = list(model.named_parameters())
            for name, p in _progress(named, len(named), "initialising weights", progress):
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                else:
                    std = 0.02
                    if name.endswith("c_proj.weight"):
                        std /= math.sqrt(2 * config.n_layer)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, src, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", block_size: int = 16,
                        num_kv_blocks: int | None = None, progress: bool = False,
                        quantize: str | None = None) -> "GPT2":
        """Load GPT-2 weights from an HF checkpoint folder, a hub name ("gpt2",
        "openai-community/gpt2-medium": through the local Hugging Face cache, downloading where
        the hub is reachable; see `gptfast.hub`), a `transformers.GPT2LMHeadModel`, or a nanoGPT
        `ckpt.pt` (see `gptfast.weights.load_checkpoint`). Random weights: `from_config`.

        `dtype` None keeps fp32 (the checkpoint's own dtype is not guessed from storage).
        `progress` shows a progress bar while the weights are copied in. `quantize="int8"` runs
        the linears and the head on int8 copies of their weights (see `quantize_weights`).
        """
        from . import hub
        from .weights import load_checkpoint

        quant.check_mode(quantize)
        ckpt = load_checkpoint(hub.snapshot(src) if hub.is_hub_id(src) else src)
        return cls.from_checkpoint(ckpt, dtype=dtype, device=device, block_size=block_size,
                                   num_kv_blocks=num_kv_blocks, progress=progress, quantize=quantize)

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", block_size: int = 16,
                        num_kv_blocks: int | None = None, progress: bool = False,
                        quantize: str | None = None) -> "GPT2":
        """The model holding a loaded `gptfast.weights.Checkpoint` (see `from_pretrained`)."""
        dtype = torch.float32 if dtype is None else dtype
        _check_dtype(dtype)
        quant.check_mode(quantize)
        # NOTE: outside inference mode (generate() converts HF models inside it): inference
        # tensors keep no version counter, which the prefix cache, the bf16 packing and the int8
        # copies rely on.
        with torch.inference_mode(False):
            model = cls._load(ckpt, dtype, device, block_size, num_kv_blocks, progress)
        return model.quantize_weights(quantize)

    @classmethod
    def _load(cls, ckpt, dtype, device, block_size, num_kv_blocks, progress) -> "GPT2":
        with torch.device("meta"):
            model = cls(ckpt.config, block_size=block_size, num_kv_blocks=num_kv_blocks)
        model = model.to(dtype=dtype).to_empty(device=device)  # cast while still on meta
        params = dict(model.named_parameters())
        if set(params) != set(ckpt.state_dict):
            missing, extra = sorted(set(params) - set(ckpt.state_dict)), sorted(set(ckpt.state_dict) - set(params))
            raise ValueError(f"{ckpt.source}: state dict does not match the model: missing {missing}, "
                             f"unexpected {extra}")
        with torch.no_grad():
            for name, tensor in _progress(ckpt.state_dict.items(), len(params), "loading weights", progress):
                params[name].copy_(tensor)  # casts to the model's dtype, one tensor at a time
        model.generation_defaults = dict(ckpt.generation)
        model.source = ckpt.source
        model.tokenizer_dir = ckpt.tokenizer_dir
        return model

    def quantize_weights(self, mode: str | None) -> "GPT2":
        """Run every block's linears and the output head on int8 copies of their weights
        (`mode="int8"`, see `gptfast.quant`) or on the float weights again (None).

        The parameters are not changed: the int8 copies are made at first use and follow the
        float weights (in-place changes, replacements, moves and casts re-quantise them).

        Returns
        -------
        self
        """
        quant.check_mode(mode)
        changed = mode != self.quantize
        self.quantize = mode
        if not changed:
            return self  # the int8 copies stay (the graphs hold their addresses)
        for holder in self._weight_holders():
            holder._quantize = mode
            holder._int8 = None
        if changed:
            # Other weights in effect: the decode graphs (captured on the other path) are rebuilt,
            # live engines pick up the new runner (`weights_version`), and cached prefixes,
            # computed with the other weights, are dropped.
            self._graph_runner = None
            if self._kv_cache is not None:
                self._kv_cache.reset_prefix_cache()
            self._weights_counter.value += 1
        return self

    def _weight_holders(self):
        """Every object `linear` keeps a derived weight copy on: the Linears and the head's."""
        return [m for m in self.modules() if isinstance(m, Linear)] + [self._head]

    def refresh_weight_copies(self) -> None:
        """Re-quantise now every int8 copy whose float weight changed since it was made.

        `linear` does this at each call; a replayed CUDA graph makes no call, so the graph
        runner calls this before each replay (the copies are refreshed in place, at the
        addresses the graphs hold)."""
        if self.quantize is None:
            return
        for holder in self._weight_holders():
            w = self.head_weight() if holder is self._head else holder.weight
            quant.int8_weight(holder, w)

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def kv_cache(self) -> KVCache:
        """The paged KV cache, allocated on first use on the model's device and dtype."""
        with _KV_CACHE_LOCK:  # threads making their first calls at once must share one cache
            cache = self._kv_cache
            if cache is None or cache.device != self.device or cache.dtype != self.dtype:
                cache = KVCache(self.config, block_size=self.block_size, num_blocks=self.num_kv_blocks,
                                dtype=self.dtype, device=self.device)
                self._kv_cache = cache
            return cache

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the model drops the cache, the decode graphs and the prepacked
        # weights (the next use re-creates them); a `.to()` that changes nothing keeps them.
        def tensors():
            return [(p.data_ptr(), p.dtype, p.device) for p in self.parameters()]

        before = tensors()
        result = super()._apply(fn, *args, **kwargs)
        if tensors() != before:
            self._kv_cache = None
            self._graph_runner = None
            for holder in self._weight_holders():
                holder._packed = None
                holder._int8 = None
            self._weights_counter.value += 1
        return result

    @property
    def weights_version(self) -> int:
        """A number that changes whenever a parameter tensor of the model may have been replaced:
        a parameter or submodule (re)registered on any of its modules (`module.weight =
        nn.Parameter(...)`, `load_state_dict(..., assign=True)`), a move or cast that changed a
        tensor, or `quantize_weights` switching mode. In-place updates keep it (the tensors stay
        where they are), and so does a `param.data = t` swap, which no module sees."""
        return self._weights_counter.value

    def head_weight(self) -> torch.Tensor:
        """The output projection's weight `[V, C]`: `wte`'s unless the config unties them."""
        return self.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    # ---------------------------------------------------------------- forward paths
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, like HF's `GPT2LMHeadModel(input_ids, attention_mask).logits`.

        Parameters
        ----------
        input_ids : LongTensor (B, T)
        attention_mask : (B, T) of 0/1 or None
            0 marks padding: padded keys are never attended to. Positions are 0..T-1 as in HF's
            forward (HF's generate, and gptfast's, count positions from the first real token).

        Returns
        -------
        logits : (B, T, vocab_size) tensor in the model's dtype.
        """
        B, T = check_token_ids(input_ids, self.config)
        device = self.device
        input_ids = input_ids.to(device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal.view(1, 1, T, T)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(B, T)} (the shape of input_ids)")
            keys = attention_mask.to(device).bool().view(B, 1, 1, T)
            mask = mask & keys
            # A query with no visible key (a left-pad position) attends to itself instead, so its
            # (meaningless) output stays finite.
            mask = mask | (~mask.any(-1, keepdim=True) & torch.eye(T, dtype=torch.bool, device=device))
        pos = torch.arange(T, device=device)
        x = self.wte(input_ids) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x, mask)
        x = self.ln_f(x)
        return linear(x, self.head_weight(), None, self._head)  # (B, T, V)

    def forward_paged(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                      logits_indices: torch.Tensor | None = None,
                      cache: KVCache | None = None, fp32_logits: bool = True,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Run a flattened ragged batch through the model with the paged KV cache.

        Parameters
        ----------
        tokens, positions : LongTensor (N,)
            The new tokens of every sequence, concatenated, and their positions.
        meta : AttnMetadata
            Slot mapping, block tables, sequence lengths, computed once for the step.
        logits_indices : LongTensor (M,) or None
            Rows of the batch whose logits are wanted (the last token of each sequence);
            None means every row.
        cache : KVCache or None
            The cache `meta` refers to (an engine passes the one its block manager belongs to);
            None: `self.kv_cache`.
        fp32_logits : bool
            Cast the logits to fp32 (False: the model's dtype, e.g. for the sampler, which
            computes in fp32 anyway).
        out : (M, vocab_size) tensor or None
            Where the logits go (that dtype, last dimension contiguous, any row stride: e.g. the
            decode graphs' buffer with rows padded to 64 elements); None allocates them.

        Returns
        -------
        logits : (M, vocab_size) tensor, fp32 (or the model's dtype, see `fp32_logits`): `out` if given.
        """
        cache = self.kv_cache if cache is None else cache
        step = self._stages(tokens, meta, logits_indices)
        return step.logits(step.run(tokens, positions, cache, logits_indices), fp32_logits, out)

    def _decode_cpu(self, tokens, positions, meta, cache) -> torch.Tensor:
        """A decode step on the CPU with as few ops as the math allows (`forward_paged`'s path
        when every row has a slot and a key: always, outside the static runner's padding rows).

        At batch 1 to 8 the matmuls stream the weights and every other op is dispatch overhead
        (and, for the ops PyTorch runs on several threads, a fork/join), so what serves every
        layer is done once per step: the pages holding keys, the key count, the padding mask of
        a ragged batch and, while it fits in `_STEP_GATHER_BYTES`, the gather of every layer's
        cached K/V (two index_selects instead of two per layer); each layer then writes its new
        K/V row into that gathered copy, and one write per step puts every layer's new rows into
        the cache. A layer runs 12 ops: LayerNorm, QKV, two row writes, SDPA (in the cache
        dtype: bf16 K/V are not copied to fp32; the kernel accumulates in fp32), out-projection,
        in-place residual add, LayerNorm, c_fc, in-place GELU, c_proj, in-place residual add.
        The math is the reference path's: the same kernels on the same operands (fp32 greedy
        tokens stay HF's)."""
        B = tokens.shape[0]
        H, D = self.config.n_head, self.config.head_dim
        C = H * D
        L = cache.k.shape[0]
        slots = meta.slot_mapping
        lens = meta.seq_lens
        block_size = cache.block_size
        longest = int(lens.max())
        pages = meta.block_tables[:, : -(-longest // block_size)]  # (B, P): only pages holding keys
        P = pages.shape[1]
        width = P * block_size  # gathered keys per row
        pages = pages.reshape(-1)  # (B * P,) int32: index_select takes it as is
        mask = None
        if not bool((lens == longest).all()):
            # a ragged batch: True where a key exists, shared by every layer
            mask = (torch.arange(longest, device=lens.device) < lens[:, None]).view(B, 1, 1, longest)
        once = 2 * L * B * width * C * cache.k.element_size() <= _STEP_GATHER_BYTES
        if once:
            k_all = cache.k.index_select(1, pages).view(L, B * width, H, D)  # every layer's keys
            v_all = cache.v.index_select(1, pages).view(L, B * width, H, D)
            # the row of each sequence's new token in the gathered copy
            rows = torch.arange(B, device=lens.device) * width + (lens.long() - 1)  # (B,)
        act = self.config.activation
        x = self.wte(tokens).add_(self.wpe(positions))  # (B, C)
        for i, block in enumerate(self.h):
            attn = block.attn
            qkv = attn.c_attn(block.ln_1(x)).view(B, 3, H, D)  # (B, 3, nh, hs)
            q, k, v = qkv.unbind(1)  # each (B, nh, hs), strided views
            if once:
                keys, values = k_all[i], v_all[i]  # (B * width, nh, hs)
                keys.index_copy_(0, rows, k)
                values.index_copy_(0, rows, v)
            else:
                k_cache, v_cache = cache.k[i], cache.v[i]  # [blocks, bs, nh, hs]
                k_cache.view(-1, H, D).index_copy_(0, slots, k)
                v_cache.view(-1, H, D).index_copy_(0, slots, v)
                keys, values = k_cache.index_select(0, pages), v_cache.index_select(0, pages)
            keys = keys.view(B, width, H, D)[:, :longest].transpose(1, 2)  # (B, nh, longest, hs)
            values = values.view(B, width, H, D)[:, :longest].transpose(1, 2)
            y = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask,
                                               scale=attn.scale)  # (B, nh, 1, hs)
            x.add_(attn.c_proj(y.view(B, C)))
            mlp = block.mlp
            h = mlp.c_fc(block.ln_2(x))  # (B, 4C)
            x.add_(mlp.c_proj(_activation_(act, h)))
        if once:
            # every layer's new K/V rows into their slots: [L, blocks * bs, nh, hs]
            cache.k.view(L, -1, H, D).index_copy_(1, slots, k_all.index_select(1, rows))
            cache.v.view(L, -1, H, D).index_copy_(1, slots, v_all.index_select(1, rows))
        x = self.ln_f(x)
        return linear(x, self.head_weight(), None, self._head)  # (B, V)

    def forward_paged_greedy(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                             logits_indices: torch.Tensor | None = None,
                             cache: KVCache | None = None,
                             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward_paged` followed by a greedy pick: token ids without the logits.

        For rows that decode greedily with no logits processor and no score output. In a
        small-batch decode step on the kernel path (see `_gemv_step`) the final LayerNorm, the
        head GEMV and the argmax are `ops.layernorm_head_argmax` (two launches, no logits
        written); elsewhere the logits and `ops.sample` with every row greedy. Either way the
        result is what `ops.sample` gives a greedy row of `forward_paged`'s logits in the model's
        dtype: the lowest id among the maxima, and the sampler's flags.

        Parameters
        ----------
        tokens, positions, meta, logits_indices, cache :
            As for `forward_paged`.
        out : (tokens, status) or None
            Contiguous (M,) int64 and (M,) int32 tensors to write into (a CUDA graph's static
            outputs); None allocates them.

        Returns
        -------
        tokens : LongTensor (M,)
            The argmax of each row's logits, -1 for a flagged row.
        status : IntTensor (M,)
            0 ok; 1 a logit is NaN or +inf; 2 no logit is finite.
        """
        cache = self.kv_cache if cache is None else cache
        step = self._stages(tokens, meta, logits_indices)
        return step.greedy(step.run(tokens, positions, cache, logits_indices), out)

    def _stages(self, tokens: torch.Tensor, meta: AttnMetadata, logits_indices: torch.Tensor | None) -> _Stages:
        """The op set of a paged step, chosen by the backend (see `_Stages`)."""
        # an int8 model takes the eager stages: its linears go through `linear`
        if ops.use_triton(tokens) and self.quantize is None:
            stages = _GemvStages if self._gemv_step(tokens, meta) else _FusedStages
        elif meta.is_decode and logits_indices is None and _plain_decode(meta):
            stages = _CpuDecodeStages
        else:
            stages = _EagerStages
        return stages(self, meta)

    def _gemv_step(self, tokens: torch.Tensor, meta: AttnMetadata) -> bool:
        """Whether a step on the kernel path takes the small-batch GEMV kernels (`_GemvStages`):
        decode steps of 1-8 rows, GPT-2's tanh-GELU, unless the op context turns them off
        (`ops.backend(..., gemv_decode=False)`). Larger batches and prefill keep `_FusedStages`
        (cuBLAS with fused epilogues)."""
        return (meta.is_decode and 1 <= tokens.shape[0] <= ops.gemv.MAX_ROWS
                and self.h[0].mlp.gelu_tanh and ops.gemv_decode_enabled())

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs):
        """HF-compatible generation; see `gptfast.generate`."""
        from .generation import generate

        return generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)


# ---------------------------------------------------------------------------- the paged step
# A paged step (a prefill or a decode step) is written once, `_Stages.run`: the embedding, then
# per block an attention stage and an MLP stage, then the rows whose logits are wanted and the
# head. Which ops implement the stages is chosen per step by the backend (`GPT2._stages`):
#
#   _EagerStages      the modules' own ops (LayerNorm, `linear`, the ops' eager references on the
#                     CPU): the reference the others match, and the path of an int8 model
#   _FusedStages      Triton with cuBLAS GEMMs: a residual add, the bias before it and the
#                     LayerNorm after it are one kernel, so each stage ends with the LayerNorm of
#                     the next (an MLP stage with the next block's ln_1)
#   _GemvStages       decode steps of 1-8 rows: fused GEMV kernels reading each weight once for
#                     all rows, every LayerNorm in the prologue of the matmul after it
#   _CpuDecodeStages  a CPU decode step in which every row writes a slot and reads a key:
#                     `GPT2._decode_cpu`, which plans the whole step at once
#
# What a stage hands the next (the "stream") belongs to the op set: the residual x (N, C) for the
# eager and GEMV sets, (x, LayerNorm(x)) for the fused one.


class _Stages:
    """The op set of one paged step: its stages over the layers, the head and a greedy pick.

    Every op set but `_CpuDecodeStages` (which replaces `run`) defines the stages `run` calls:

    embed(tokens, positions) -> stream
        tokens, positions: (N,) int64, the step's new tokens.
    attention(block, stream, k_cache, v_cache) -> stream
        ln_1, c_attn, the new K/V into the cache ([blocks, bs, nh, hs] each), attention, c_proj,
        the residual add.
    mlp(block, stream, after) -> stream
        ln_2, c_fc, the activation, c_proj, the residual add; `after` is the LayerNorm that
        follows (the next block's ln_1, or ln_f), for op sets that end a stage with it.
    rows(stream, indices) -> stream
        The rows whose logits are wanted, (M,) int64.
    logits(stream, fp32, out) -> (M, V) tensor
        The head, fp32 or the model's dtype; into `out` (any row stride) when it is not None.
    """

    def __init__(self, model: GPT2, meta: AttnMetadata):
        self.model = model
        self.meta = meta
        self.eps = model.config.layer_norm_epsilon

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
            logits_indices: torch.Tensor | None):
        """The step: the stream after the last block, at the rows of `logits_indices`."""
        blocks = self.model.h
        stream = self.embed(tokens, positions)
        for i, block in enumerate(blocks):
            after = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.model.ln_f  # the next LayerNorm
            stream = self.attention(block, stream, cache.k[i], cache.v[i])  # [blocks, bs, nh, hs] each
            stream = self.mlp(block, stream, after)
        return stream if logits_indices is None else self.rows(stream, logits_indices)

    def greedy(self, stream, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest id among each row's maximal logits (in the model's dtype) and the sampler's
        flags, as `ops.sample` gives them for greedy rows; into `out` = (tokens, status) if given."""
        logits = self.logits(stream, fp32=False, out=None)  # (M, V)
        M, device = logits.shape[0], logits.device
        zeros_f = torch.zeros(M, dtype=torch.float32, device=device)
        zeros_l = torch.zeros(M, dtype=torch.int64, device=device)
        return ops.sample(logits, zeros_f, zeros_l.int(), zeros_f + 1.0, zeros_l, zeros_l, out=out)


class _EagerStages(_Stages):
    """Each module's own ops; attention through `gptfast.ops` (the references on the CPU)."""

    def embed(self, tokens, positions):
        m = self.model
        return m.wte(tokens) + m.wpe(positions)  # (N, C)

    def attention(self, block, x, k_cache, v_cache):
        attn, meta = block.attn, self.meta
        N, C = x.shape
        qkv = attn.c_attn(block.ln_1(x)).view(N, 3, attn.n_head, attn.head_dim)  # (N, 3, nh, hs)
        q, k, v = qkv.unbind(1)  # each (N, nh, hs), strided views
        ops.kv_cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            y = ops.decode_attention(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens, attn.scale)
        else:
            y = ops.prefill_attention(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                      meta.seq_lens, attn.scale, meta.max_seqlen_q)
        return x + attn.c_proj(y.reshape(N, C))  # (N, nh, hs) -> (N, C)

    def mlp(self, block, x, after):
        return x + block.mlp(block.ln_2(x))

    def rows(self, x, indices):
        return x.index_select(0, indices)  # (M, C)

    def logits(self, x, fp32: bool, out=None):
        m = self.model
        logits = linear(m.ln_f(x), m.head_weight(), None, m._head)  # (M, V)
        return _logits_out(logits, fp32, out)


class _FusedStages(_Stages):
    """Triton and cuBLAS (the path on CUDA): the stream is (x, h), the residual and its
    normalised copy. Each residual add with the bias of the projection before it and the
    LayerNorm after it is one kernel (`ops.add_layernorm`), and so are the embedding and the
    first LayerNorm; decode steps add the c_attn bias and append the new K/V inside the attention
    kernel (a one-row F.linear with a bias is two kernels: bias copy, GEMM)."""

    def embed(self, tokens, positions):
        m = self.model
        ln = m.h[0].ln_1
        return ops.embed_layernorm(tokens, positions, m.wte.weight, m.wpe.weight, ln.weight, ln.bias,
                                   self.eps)  # (x, h), (N, C) each

    def attention(self, block, stream, k_cache, v_cache):
        x, h = stream
        attn, meta = block.attn, self.meta
        N, C = h.shape
        bias = attn.c_attn.bias
        fuse_bias = meta.is_decode and bias is not None
        qkv = F.linear(h, attn.c_attn.weight, None if fuse_bias else bias)
        q, k, v = qkv.view(N, 3, attn.n_head, attn.head_dim).unbind(1)  # each (N, nh, hs), strided views
        if meta.is_decode:
            qkv_bias = bias.view(3, attn.n_head, attn.head_dim) if fuse_bias else None
            y = ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, attn.scale,
                                     k_new=k, v_new=v, slot_mapping=meta.slot_mapping, qkv_bias=qkv_bias)
        else:
            ops.kv_cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
            y = ops.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                      meta.seq_lens, attn.scale, meta.max_seqlen_q)
        y = F.linear(y.reshape(N, C), attn.c_proj.weight)  # (N, nh, hs) -> (N, C); its bias is added below
        ln = block.ln_2
        return ops.add_layernorm(x, y, attn.c_proj.bias, ln.weight, ln.bias, self.eps)

    def mlp(self, block, stream, after):
        x, h = stream
        mlp = block.mlp
        if mlp.gelu_tanh:  # bias + GELU as the c_fc matmul's epilogue
            a = ops.linear_gelu(h, mlp.c_fc.weight, mlp.c_fc.bias)
        else:
            a = mlp.act(F.linear(h, mlp.c_fc.weight, mlp.c_fc.bias))
        y = F.linear(a, mlp.c_proj.weight)  # its bias is added below
        return ops.add_layernorm(x, y, mlp.c_proj.bias, after.weight, after.bias, self.eps)

    def rows(self, stream, indices):
        return None, stream[1].index_select(0, indices)  # (M, C): the head reads h only

    def logits(self, stream, fp32: bool, out=None):
        if out is not None and not fp32:
            return torch.mm(stream[1], self.model.head_weight().t(), out=out)  # cuBLAS writes rows of any stride
        logits = F.linear(stream[1], self.model.head_weight())  # (M, V), the model's dtype
        return _logits_out(logits, fp32, out)


class _GemvStages(_Stages):
    """A decode step of 1-8 rows as fused GEMV kernels, every weight read once for all the rows:
    5 launches per block, the head 1 (logits) or 2 (greedy tokens); gpt2 (12 blocks): 61 or 62.

    Per block: ln_1 -> c_attn + bias (block 0 gathers the embedding in this kernel's prologue, so
    there is no embedding kernel); split-KV attention partials with the K/V append; the partials'
    merge -> c_proj + bias + residual; ln_2 -> c_fc + bias + GELU; c_proj + bias + residual.
    """

    def embed(self, tokens, positions):
        self.tokens, self.positions = tokens, positions
        return None  # not gathered yet: block 0's first kernel does it

    def attention(self, block, x, k_cache, v_cache):
        attn, ln, meta = block.attn, block.ln_1, self.meta
        if x is None:
            m = self.model
            qkv, x = ops.embed_layernorm_linear(self.tokens, self.positions, m.wte.weight, m.wpe.weight,
                                                ln.weight, ln.bias, self.eps, attn.c_attn.weight, attn.c_attn.bias)
        else:
            qkv = ops.layernorm_linear(x, ln.weight, ln.bias, self.eps, attn.c_attn.weight, attn.c_attn.bias)
        N = qkv.shape[0]
        q, k, v = qkv.view(N, 3, attn.n_head, attn.head_dim).unbind(1)  # each (N, nh, hs), strided views
        part_acc, part_ml = ops.decode_attention_partials(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                          attn.scale, k_new=k, v_new=v,
                                                          slot_mapping=meta.slot_mapping)
        return ops.attn_merge_linear_residual(part_acc, part_ml, attn.c_proj.weight, attn.c_proj.bias, x)

    def mlp(self, block, x, after):
        mlp, ln = block.mlp, block.ln_2
        h = ops.layernorm_linear(x, ln.weight, ln.bias, self.eps, mlp.c_fc.weight, mlp.c_fc.bias, gelu=True)
        return ops.linear_residual(h, mlp.c_proj.weight, mlp.c_proj.bias, x)

    def rows(self, x, indices):
        return x.index_select(0, indices)  # (M, C)

    def logits(self, x, fp32: bool, out=None):
        # the final LayerNorm in the head GEMV's prologue; fp32 logits straight from it
        m, ln = self.model, self.model.ln_f
        return ops.layernorm_linear(x, ln.weight, ln.bias, self.eps, m.head_weight(), None,
                                    out_dtype=torch.float32 if fp32 else None, out=out)  # (M, V)

    def greedy(self, x, out=None):
        # the final LayerNorm, the head GEMV and the argmax in two launches, no logits written
        m, ln = self.model, self.model.ln_f
        return ops.layernorm_head_argmax(x, ln.weight, ln.bias, self.eps, m.head_weight(), out=out)


class _CpuDecodeStages(_Stages):
    """`GPT2._decode_cpu`: a CPU decode step planned as a whole (what serves every layer is done
    once per step); its stream is the logits (B, V) in the model's dtype."""

    def run(self, tokens, positions, cache, logits_indices):
        return self.model._decode_cpu(tokens, positions, self.meta, cache)

    def logits(self, logits, fp32: bool, out=None):
        return _logits_out(logits, fp32, out)


def _logits_out(logits: torch.Tensor, fp32_logits: bool, out: torch.Tensor | None) -> torch.Tensor:
    """`forward_paged`'s result: the logits cast to fp32 when asked, into `out` when given (one copy,
    as the cast alone would be)."""
    if out is not None:
        return out.copy_(logits)
    return logits.float() if fp32_logits else logits


def _progress(items, total: int, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", leave=False)


def _check_dtype(dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def check_token_ids(input_ids, config: GPT2Config, name: str = "input_ids") -> tuple[int, int]:
    """Check a batch of token ids for a model of `config`; raise a TypeError or ValueError naming
    `name`, the value seen and what is allowed.

    Parameters
    ----------
    input_ids : integer tensor (B, T)
        Token ids, each in [0, config.vocab_size), T <= config.n_positions, B and T >= 1.
    config : GPT2Config
    name : str
        What the caller calls `input_ids`, for the messages.

    Returns
    -------
    (B, T) : the batch size and length.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)})")
    if T > config.n_positions:
        raise ValueError(f"{name} has {T} positions, more than the model's n_positions "
                         f"({config.n_positions})")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
    return B, T


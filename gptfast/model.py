"""The GPT-2 module: embeddings, pre-LN blocks, final LayerNorm, tied head.

Two forward paths share the weights:

- `GPT2.forward(input_ids, attention_mask)`: dense, like HF's `GPT2LMHeadModel.forward`, for
  scoring a padded batch (logits for every position).
- `GPT2.forward_paged(tokens, positions, meta, logits_indices)`: the generation path. Tokens of
  all sequences are flattened into one ragged batch (no padding); K/V live in the paged cache
  (`kv_cache.py`) and attention goes through `gptfast.ops`, which pick the Triton kernels on CUDA
  and the eager references on the CPU.
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
_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

if TYPE_CHECKING:
    from .weights import Checkpoint


# fp32 matmuls with at least this many rows run on oneDNN's prepacked weight (see `linear`)
_PACKED_FP32_ROWS = 3


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, holder) -> torch.Tensor:
    """`F.linear(x, w, b)`; on the CPU, oneDNN's linear on a copy of `w` prepacked for it, kept on
    `holder._packed`, for bf16 weights and for fp32 weights with at least `_PACKED_FP32_ROWS`
    rows. Measured single-threaded on an AVX-512 Xeon (GPT-2 124M's decode matmuls): bf16 ~1.5x
    faster than `F.linear` (the plain bf16 path re-lays the weight out on every call); fp32 at 8
    rows 2.5-3.5x faster, at 4 rows ~2x, at 1-2 rows 0.8-0.9x (so those keep `F.linear`). The
    packed copy is rebuilt whenever the weight is replaced, cast or modified in place (its
    address, dtype or version counter changes). When `holder._quantize` is "int8", the matmul runs
    on the holder's int8 copy of `w` (`gptfast.quant`), which follows `w` the same way."""
    if holder._quantize is not None:
        q = quant.int8_weight(holder, w)
        if x.device.type == "cpu" and not ops.use_triton(x):
            return quant.int8_linear_cpu(x, q, b)
        return ops.int8_linear(x, q.q, q.scale, b)
    if w.device.type == "cpu" and _MKLDNN_LINEAR and (
            w.dtype is torch.bfloat16 or (w.dtype is torch.float32 and x.numel() >= _PACKED_FP32_ROWS * w.shape[1])):
        try:
            key = (w.data_ptr(), w._version, w.dtype)
        except RuntimeError:  # an inference tensor keeps no version counter: no cache
            return F.linear(x, w, b)
        packed = holder._packed
        if packed is None or packed[0] != key:
            # the batch-size hint picks oneDNN's layout: decode batches (1 for bf16, 8 for fp32)
            packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1 if w.dtype is torch.bfloat16 else 8))
            holder._packed = packed
        return torch.ops.mkldnn._linear_pointwise(x, packed[1], b, "none", [], "")
    return F.linear(x, w, b)


class _PackedHolder:
    _packed: tuple | None = None
    _quantize: str | None = None  # "int8": the matmul runs on `_int8`
    _int8 = None  # gptfast.quant.Int8Weight


class Linear(nn.Linear):
    """nn.Linear through `linear` (prepacked bf16 weights on the CPU, int8 copies when the
    model is quantised)."""

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
    static runner's padding rows do neither; they take the general path)."""
    return (meta.slot_mapping.device.type == "cpu" and bool((meta.slot_mapping >= 0).all())
            and bool((meta.seq_lens > 0).all()))


class Attention(nn.Module):
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

    def forward_paged(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttnMetadata) -> torch.Tensor:
        """Paged attention. x: (N, C) flattened new tokens; k_cache/v_cache: [blocks, bs, H, D]."""
        N, C = x.shape
        qkv = self.c_attn(x).view(N, 3, self.n_head, self.head_dim)  # (N, 3, nh, hs)
        q, k, v = qkv.unbind(1)  # each (N, nh, hs), strided views
        ops.kv_cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            y = ops.decode_attention(q.contiguous(), k_cache, v_cache, meta.block_tables,
                                     meta.seq_lens, self.scale)
        else:
            y = ops.prefill_attention(q.contiguous(), k_cache, v_cache, meta.block_tables,
                                      meta.cu_seqlens_q, meta.seq_lens, self.scale,
                                      meta.max_seqlen_q)
        return self.c_proj(y.reshape(N, C))  # (N, nh, hs) -> (N, C)

    def forward_fused(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttnMetadata) -> torch.Tensor:
        """`forward_paged` with fewer kernels: no copy of q; in decode steps the c_attn bias and
        the K/V append inside the attention kernel (a one-row F.linear with a bias is two kernels:
        bias copy, GEMM); c_proj without its bias (the caller's `add_layernorm` adds it)."""
        N, C = x.shape
        bias = self.c_attn.bias
        fuse_bias = meta.is_decode and bias is not None
        qkv = F.linear(x, self.c_attn.weight, None if fuse_bias else bias)
        q, k, v = qkv.view(N, 3, self.n_head, self.head_dim).unbind(1)  # each (N, nh, hs), strided views
        if meta.is_decode:
            qkv_bias = bias.view(3, self.n_head, self.head_dim) if fuse_bias else None
            y = ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                     k_new=k, v_new=v, slot_mapping=meta.slot_mapping, qkv_bias=qkv_bias)
        else:
            ops.kv_cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
            y = ops.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                      meta.seq_lens, self.scale, meta.max_seqlen_q)
        return F.linear(y.reshape(N, C), self.c_proj.weight)  # (N, nh, hs) -> (N, C), no bias


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_dim, bias=config.bias)
        self.c_proj = Linear(config.mlp_dim, config.n_embd, bias=config.bias)
        self.act = _activation(config.activation)
        self.gelu_tanh = config.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP with bias + GELU as the c_fc matmul's epilogue and c_proj without its bias
        (the caller's `add_layernorm` adds it)."""
        if self.gelu_tanh:
            h = ops.linear_gelu(x, self.c_fc.weight, self.c_fc.bias)
        else:
            h = self.act(F.linear(x, self.c_fc.weight, self.c_fc.bias))
        return F.linear(h, self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def forward_paged(self, x, k_cache, v_cache, meta):
        x = x + self.attn.forward_paged(self.ln_1(x), k_cache, v_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
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
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.generation_defaults: dict = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
        self._kv_cache: KVCache | None = None
        self._graph_runner = None  # (fingerprint, gptfast.graphs.DecodeGraphRunner)
        self._head = _PackedHolder()  # the head's prepacked or int8 weight (see `linear`)
        self.quantize: str | None = None  # see `quantize_weights`
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
        for holder in self._weight_holders():
            holder._quantize = mode
            holder._int8 = None
        if changed:
            # Other weights in effect: the decode graphs (captured on the other path) are rebuilt,
            # live engines pick up the new runner (the epoch), and cached prefixes, computed with
            # the other weights, are dropped.
            from .graphs import _bump_weights_epoch

            self._graph_runner = None
            if self._kv_cache is not None:
                self._kv_cache.reset_prefix_cache()
            _bump_weights_epoch()
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
            from .graphs import _bump_weights_epoch

            self._kv_cache = None
            self._graph_runner = None
            for holder in self._weight_holders():
                holder._packed = None
                holder._int8 = None
            _bump_weights_epoch()
        return result

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
        B, T = _check_ids(input_ids, self.config, name="input_ids")
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
                      cache: KVCache | None = None, fp32_logits: bool = True) -> torch.Tensor:
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

        Returns
        -------
        logits : (M, vocab_size) tensor, fp32 (or the model's dtype, see `fp32_logits`).
        """
        cache = self.kv_cache if cache is None else cache
        # (an int8 model runs the general path below: its linears go through `linear`)
        if ops.use_triton(tokens) and self.quantize is None and self._gemv_step(tokens, meta):
            x = self._forward_gemv(tokens, positions, meta, logits_indices, cache)
            ln = self.ln_f
            # the final LayerNorm in the head GEMV's prologue; fp32 logits straight from it
            return ops.layernorm_linear(x, ln.weight, ln.bias, self.config.layer_norm_epsilon,
                                        self.head_weight(), None,
                                        out_dtype=torch.float32 if fp32_logits else None)  # (M, V)
        if ops.use_triton(tokens) and self.quantize is None:
            logits = self._forward_fused(tokens, positions, meta, logits_indices, cache)
            return logits.float() if fp32_logits else logits
        if meta.is_decode and logits_indices is None and _plain_decode(meta):
            logits = self._decode_cpu(tokens, positions, meta, cache)
            return logits.float() if fp32_logits else logits
        x = self.wte(tokens) + self.wpe(positions)  # (N, C)
        for i, block in enumerate(self.h):
            x = block.forward_paged(x, cache.k[i], cache.v[i], meta)
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)  # (M, C)
        x = self.ln_f(x)
        logits = linear(x, self.head_weight(), None, self._head)  # (M, V)
        return logits.float() if fp32_logits else logits

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

    def _forward_fused(self, tokens, positions, meta, logits_indices, cache) -> torch.Tensor:
        """`forward_paged` with the fused ops (the path on CUDA): each residual add, the bias of
        the projection before it and the LayerNorm after it are one kernel, and so are the
        embedding and the first LayerNorm. x is the residual stream, h its normalised copy."""
        eps = self.config.layer_norm_epsilon
        blocks = self.h
        ln = blocks[0].ln_1
        x, h = ops.embed_layernorm(tokens, positions, self.wte.weight, self.wpe.weight,
                                   ln.weight, ln.bias, eps)  # (N, C) each
        for i, block in enumerate(blocks):
            y = block.attn.forward_fused(h, cache.k[i], cache.v[i], meta)
            x, h = ops.add_layernorm(x, y, block.attn.c_proj.bias, block.ln_2.weight,
                                     block.ln_2.bias, eps)
            y = block.mlp.forward_fused(h)
            ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.ln_f
            x, h = ops.add_layernorm(x, y, block.mlp.c_proj.bias, ln.weight, ln.bias, eps)
        if logits_indices is not None:
            h = h.index_select(0, logits_indices)  # (M, C)
        return F.linear(h, self.head_weight())  # (M, V), the model's dtype

    def forward_paged_greedy(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                             logits_indices: torch.Tensor | None = None,
                             cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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

        Returns
        -------
        tokens : LongTensor (M,)
            The argmax of each row's logits, -1 for a flagged row.
        status : IntTensor (M,)
            0 ok; 1 a logit is NaN or +inf; 2 no logit is finite.
        """
        cache = self.kv_cache if cache is None else cache
        if ops.use_triton(tokens) and self.quantize is None and self._gemv_step(tokens, meta):
            x = self._forward_gemv(tokens, positions, meta, logits_indices, cache)
            ln = self.ln_f
            return ops.layernorm_head_argmax(x, ln.weight, ln.bias, self.config.layer_norm_epsilon,
                                             self.head_weight())
        logits = self.forward_paged(tokens, positions, meta, logits_indices, cache, fp32_logits=False)
        M, device = logits.shape[0], logits.device
        zeros_f = torch.zeros(M, dtype=torch.float32, device=device)
        zeros_l = torch.zeros(M, dtype=torch.int64, device=device)
        return ops.sample(logits, zeros_f, zeros_l.int(), zeros_f + 1.0, zeros_l, zeros_l)

    def _gemv_step(self, tokens: torch.Tensor, meta: AttnMetadata) -> bool:
        """Whether a step on the kernel path takes the small-batch GEMV kernels (`_forward_gemv`):
        decode steps of 1-8 rows, GPT-2's tanh-GELU. Larger batches and prefill keep
        `_forward_fused` (cuBLAS with fused epilogues)."""
        return (meta.is_decode and 1 <= tokens.shape[0] <= ops.gemv.MAX_ROWS
                and self.h[0].mlp.gelu_tanh)

    def _forward_gemv(self, tokens, positions, meta, logits_indices, cache) -> torch.Tensor:
        """The decode step for 1-8 rows as fused GEMV kernels: 5 launches per block, every weight
        read once for all the rows. Returns the residual stream before ln_f, (M, C).

        Per block: K1 ln_1 -> c_attn + bias (block 0 gathers the embedding in its prologue, so
        there is no embedding kernel); K2 split-KV attention partials with the K/V append; K3
        the partials' merge -> c_proj + bias + residual; K4 ln_2 -> c_fc + bias + GELU; K5 c_proj
        + bias + residual. The head (ln_f in its prologue) is the caller's: 1 launch for logits,
        2 for greedy tokens. gpt2 (12 blocks): 60 + 1 (or 2) kernels for the forward.
        """
        eps = self.config.layer_norm_epsilon
        N = tokens.shape[0]
        for i, block in enumerate(self.h):
            attn, mlp = block.attn, block.mlp
            ln = block.ln_1
            if i == 0:
                qkv, x = ops.embed_layernorm_linear(tokens, positions, self.wte.weight, self.wpe.weight, ln.weight,
                                                    ln.bias, eps, attn.c_attn.weight, attn.c_attn.bias)
            else:
                qkv = ops.layernorm_linear(x, ln.weight, ln.bias, eps, attn.c_attn.weight, attn.c_attn.bias)
            q, k, v = qkv.view(N, 3, attn.n_head, attn.head_dim).unbind(1)  # each (N, nh, hs), strided views
            part_acc, part_ml = ops.decode_attention_partials(q, cache.k[i], cache.v[i], meta.block_tables,
                                                              meta.seq_lens, attn.scale, k_new=k, v_new=v,
                                                              slot_mapping=meta.slot_mapping)
            x = ops.attn_merge_linear_residual(part_acc, part_ml, attn.c_proj.weight, attn.c_proj.bias, x)
            ln = block.ln_2
            h = ops.layernorm_linear(x, ln.weight, ln.bias, eps, mlp.c_fc.weight, mlp.c_fc.bias, gelu=True)
            x = ops.linear_residual(h, mlp.c_proj.weight, mlp.c_proj.bias, x)
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)  # (M, C)
        return x

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs):
        """HF-compatible generation; see `gptfast.generate`."""
        from .generation import generate

        return generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _progress(items, total: int, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", leave=False)


def _check_dtype(dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def _check_ids(input_ids, config: GPT2Config, name: str) -> tuple[int, int]:
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


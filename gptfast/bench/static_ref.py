"""The eager reference that `torch.compile` gets to work on: GPT-2 greedy decoding in plain PyTorch
over a dense, static KV cache (gpt-fast's recipe), on the weights of a `gptfast.GPT2`.

One decode step for tokens `t[B]` at position `p` (the same for every row):

    x = wte[t] + wpe[p]                                          # (B, C)
    per layer i:
        q, k, v = LN_1(x) W_attn + b_attn                        # each (B, H, D)
        K_i[:, :, p] = k;  V_i[:, :, p] = v                      # K_i, V_i: [B, H, T_max, D]
        y = softmax(scale * q K_i^T + mask) V_i, mask[j] = -inf for j > p
        x = x + y W_proj + b_proj
        x = x + act(LN_2(x) W_fc + b_fc) W_fc_proj + b_fc_proj
    next = argmax(LN_f(x) W_head^T)                              # greedy, lowest id on ties

Every shape is fixed by (batch_size, max_len): the cache is dense, `[L, B, H, T_max, D]` for K and
for V, held as one `[B, H, T_max, D]` buffer per layer (so each step's write is an in-place
`index_copy_` into a graph input; writing through a view of one big tensor can make the compiler
copy the whole tensor), written at a position held in a 1-element tensor, and attention always
runs over all `T_max` positions with the unwritten ones masked out. So `torch.compile(decode_one,
mode="reduce-overhead", fullgraph=True)` traces once and, on CUDA, replays one CUDA graph per
token. Bytes per step: every weight once (one `wpe` row) plus the whole cache of the K/V of
`T_max` positions, masked or not.

The prompt is prefilled eagerly (causal SDPA, once per `generate`), so time to first token is
eager PyTorch's. Prompts are not padded: all rows of a batch share one prompt length (the e2e
suite uses batch 1).

References: gpt-fast `generate.py` / `model.py` (static KV cache, `decode_one_token` compiled
with mode="reduce-overhead"); PyTorch's `torch.compile` documentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StaticCacheGenerator"]

# `GPT2Config.activation` -> the function, written out here so the reference stays independent of
# the model's own code
_ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class _LayerCache(nn.Module):
    """One layer's K and V, `[B, H, T_max, D]` each."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class StaticCacheGenerator(nn.Module):
    """Greedy generation over a dense static KV cache, optionally through `torch.compile`.

    Parameters
    ----------
    model : gptfast.GPT2
        The weights (read in place, never copied; the generator runs on the model's device and
        dtype).
    batch_size : int
        Rows per `generate` call (fixed: it is part of the cache's shape).
    max_len : int or None
        Longest prompt + new tokens (the cache's `T_max`); None: the model's `n_positions`.
        Attention reads all `max_len` positions every step, so keep it tight.
    compile : bool
        Compile the decode step with `torch.compile(mode=mode, fullgraph=True)`. The first
        `generate` call then compiles (minutes on a GPU for the larger shapes); later calls of the
        same shapes reuse it.
    mode : str
        The `torch.compile` mode (default "reduce-overhead": CUDA graphs on CUDA; on the CPU
        inductor says it skips the CUDA graphs and compiles the step alone).

    Examples
    --------
    >>> model = gptfast.GPT2.from_config("tiny", seed=0)
    >>> gen = StaticCacheGenerator(model, batch_size=1, max_len=16)
    >>> gen.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5).shape
    torch.Size([1, 8])
    """

    def __init__(self, model, batch_size: int = 1, max_len: int | None = None, compile: bool = False,
                 mode: str = "reduce-overhead"):
        super().__init__()
        config = model.config
        max_len = config.n_positions if max_len is None else max_len
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_len, int) or not 2 <= max_len <= config.n_positions:
            raise ValueError(f"max_len must be an int in [2, n_positions={config.n_positions}], "
                             f"got {max_len!r}")
        self.model = model  # a submodule: its weights are static inputs of the compiled step
        self.batch_size = batch_size
        self.max_len = max_len
        self.act = _ACTIVATIONS[config.activation]
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        # NOTE: zeros, not empty: masked positions get weight 0 in attention, and 0 * NaN from an
        # uninitialised slot would still poison the output. Slots left by an earlier call are
        # finite and masked until overwritten.
        with torch.inference_mode(False):  # mutable across calls made in or out of inference mode
            self.caches = nn.ModuleList(_LayerCache(shape, model.dtype, model.device)
                                        for _ in range(config.n_layer))
            self.register_buffer("slots", torch.arange(max_len, device=model.device), persistent=False)
        self.compiled = compile
        if compile:
            # The caches are mutated inside the graph; a static address lets CUDA graphs keep them.
            for cache in self.caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
            self.decode = torch.compile(self.decode_one, mode=mode, fullgraph=True)
        else:
            self.decode = self.decode_one

    # ---------------------------------------------------------------- the two steps
    def decode_one(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One greedy decode step.

        Parameters
        ----------
        tokens : LongTensor (B,)
            Each row's newest token, at position `pos`.
        pos : LongTensor (1,)
            Its position (every row's); its K/V are written into the cache there.

        Returns
        -------
        LongTensor (B,): the next token of each row.
        """
        m = self.model
        B, H, D = self.batch_size, m.config.n_head, m.config.head_dim
        C = H * D
        x = F.embedding(tokens, m.wte.weight) + F.embedding(pos, m.wpe.weight)  # (B, C)
        visible = (self.slots <= pos).view(1, 1, 1, self.max_len)  # keys 0..pos
        for i, block in enumerate(m.h):
            attn = block.attn
            qkv = F.linear(block.ln_1(x), attn.c_attn.weight, attn.c_attn.bias).view(B, 3, H, D)
            q, k, v = qkv.unbind(1)  # each (B, H, D)
            cache = self.caches[i]  # k, v: [B, H, T_max, D]
            cache.k.index_copy_(2, pos, k.unsqueeze(2))
            cache.v.index_copy_(2, pos, v.unsqueeze(2))
            y = F.scaled_dot_product_attention(q.unsqueeze(2), cache.k, cache.v, attn_mask=visible,
                                               scale=attn.scale)  # (B, H, 1, D)
            x = x + F.linear(y.reshape(B, C), attn.c_proj.weight, attn.c_proj.bias)
            mlp = block.mlp
            h = self.act(F.linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias))  # (B, 4C)
            x = x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        logits = F.linear(m.ln_f(x), m.head_weight())  # (B, V)
        return logits.argmax(-1)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts (B, T) eagerly with causal SDPA, fill cache positions 0..T-1, and
        return each row's first new token (B,)."""
        m = self.model
        B, T = input_ids.shape
        H, D = m.config.n_head, m.config.head_dim
        C = H * D
        x = m.wte(input_ids) + m.wpe(self.slots[:T])  # (B, T, C)
        for i, block in enumerate(m.h):
            attn = block.attn
            qkv = F.linear(block.ln_1(x), attn.c_attn.weight, attn.c_attn.bias).view(B, T, 3, H, D)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, T, D)
            self.caches[i].k[:, :, :T] = k  # cache k, v: [B, H, T_max, D]
            self.caches[i].v[:, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)  # (B, H, T, D)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), attn.c_proj.weight, attn.c_proj.bias)
            mlp = block.mlp
            x = x + F.linear(self.act(F.linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias)),
                             mlp.c_proj.weight, mlp.c_proj.bias)
        logits = F.linear(m.ln_f(x[:, -1]), m.head_weight())  # (B, V)
        return logits.argmax(-1)

    # ---------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, streamer=None) -> torch.Tensor:
        """Greedy generation, like HF's `generate(input_ids, max_new_tokens=..., do_sample=False)`
        with EOS disabled: exactly `max_new_tokens` new tokens per row.

        Parameters
        ----------
        input_ids : LongTensor (batch_size, T)
            Prompts of one length (no padding), T + max_new_tokens <= max_len.
        max_new_tokens : int
            New tokens per row, >= 1.
        streamer : object with `put(tokens)` / `end()`, optional
            As in HF: first the prompt, then each new token (a CPU tensor of shape (B,)), then
            `end()`. Each `put` waits for the device; without a streamer no step waits.
            The call runs in inference mode whatever the caller's mode, so a compiled step is
            traced once for all callers.

        Returns
        -------
        LongTensor (batch_size, T + max_new_tokens) on the model's device: prompt + new tokens.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor (batch, T), got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids has {B} rows; this generator was built for batch_size "
                             f"{self.batch_size}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if T < 1 or T + max_new_tokens > self.max_len:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens do not fit in max_len "
                             f"{self.max_len} (need 1 <= T and T + max_new_tokens <= max_len)")
        device = self.slots.device
        ids = input_ids.to(device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = torch.empty((B, T + max_new_tokens), dtype=torch.long, device=device)
        out[:, :T] = ids
        token = self.prefill(ids)  # (B,)
        out[:, T] = token
        if streamer is not None:
            streamer.put(token.cpu())
        # The step's inputs live in buffers of their own: on CUDA a compiled step's output is
        # overwritten by the next replay, so it is copied out before that.
        current = token.clone()
        pos = torch.full((1,), T, dtype=torch.long, device=device)
        for i in range(1, max_new_tokens):
            if self.compiled:
                # each step is a new CUDA-graph-tree iteration: the last step's output was copied out
                torch.compiler.cudagraph_mark_step_begin()
            nxt = self.decode(current, pos)
            out[:, T + i] = nxt
            if streamer is not None:
                streamer.put(nxt.cpu())
            current.copy_(nxt)
            pos.add_(1)
        if streamer is not None:
            streamer.end()
        return out

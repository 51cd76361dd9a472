"""Small, realistic test checkpoints written to a temporary folder, and plain-torch references.

Shared by the weight-loading tests and the model parity tests:

- `make_hf_model` / `save_hf_checkpoint`: a random transformers GPT-2 and its folder in the
  layouts transformers and the Hub use (safetensors, .bin, sharded, with a tokenizer);
- `hf_model_from_state_dict`: the transformers model computing what a gptfast state dict means;
- `make_nanogpt_checkpoint` / `nanogpt_reference_logits`: a ckpt.pt as nanoGPT's train.py
  writes it, and nanoGPT's forward pass written out in plain torch.

Weights are random but not HF's init: LayerNorm weights and every bias are random too (HF
starts them at 1 and 0, which would hide a dropped or swapped bias), and Linear weights have
std 1/sqrt(fan_in) so attention is far from uniform.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from gptfast.config import GPT2Config, get_config

# The HF-parity suites' two shapes: an odd vocabulary, and ten heads of width 8 with EOS = BOS
PARITY_CONFIGS = {
    "tiny-odd": get_config("tiny-odd"),
    "h10": GPT2Config(vocab_size=1031, n_positions=200, n_embd=80, n_layer=3, n_head=10,
                      bos_token_id=1030, eos_token_id=1030),
}

# gptfast activation -> the name HF's config.json uses for it.
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# A tiny corpus for training test tokenizers: English, code, emoji, CJK, accents, so that
# merges form multi-byte tokens and single characters split across tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "def forward(self, x):\n    return self.proj(x) + x  # residual\n",
    "Hello world! Hello there, world. 12345 67890 3.14159",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🙂😀🎉🚀👍🏽 and flags 🇫🇷🇯🇵, family 👨‍👩‍👧‍👦.",
    "Café, naïve, façade, jalapeño, Zürich, São Paulo, Ærøskøbing.",
    "Ελληνικά γράμματα και русский текст тоже здесь.",
]


def _random_(params: dict[str, torch.nn.Parameter], seed: int, conv1d: bool) -> None:
    """Fill named parameters in place from a generator seeded with `seed` (see module doc).

    `conv1d`: matrices are HF Conv1D weights (in, out) rather than nn.Linear (out, in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if ".ln_" in name or name.startswith("ln_"):
                value = 1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
            elif name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")) or p.ndim == 1:
                value = 0.1 * noise
            else:
                fan_in = p.shape[0] if conv1d else p.shape[1]
                value = noise / math.sqrt(fan_in)
            p.copy_(value.to(p.dtype))


def hf_config(config: GPT2Config):
    """The transformers `GPT2Config` of a gptfast `GPT2Config` (eager attention)."""
    import transformers

    if not config.bias:
        raise ValueError("HF GPT-2 always has biases; a bias=False config has no HF equivalent")
    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function=HF_ACTIVATION[config.activation],
        layer_norm_epsilon=config.layer_norm_epsilon,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        attn_implementation="eager",
    )


def make_hf_model(config: GPT2Config, seed: int):
    """A random transformers `GPT2LMHeadModel` of shape `config`: fp32, eval mode, eager attention.

    Torch's global RNG is left as it was.

    Examples
    --------
    >>> model = make_hf_model(PRESETS["tiny-odd"], seed=0)
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 997])
    """
    import transformers

    with torch.random.fork_rng(devices=[]):
        model = transformers.GPT2LMHeadModel(hf_config(config))
    # named_parameters lists a tied lm_head once, under wte's name.
    _random_(dict(model.named_parameters()), seed, conv1d=True)
    return model.float().eval()


def hf_model_from_state_dict(config: GPT2Config, state_dict: dict[str, torch.Tensor]):
    """The transformers model that computes what a gptfast `(config, state_dict)` means.

    A bias=False config gets zero biases and LayerNorm biases, which compute the same thing.
    Weights are copied in fp32.
    """
    import transformers

    with torch.random.fork_rng(devices=[]):
        model = transformers.GPT2LMHeadModel(hf_config(config.replace(bias=True))).float().eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            key = name.removeprefix("transformer.")
            if key not in state_dict:
                if config.bias or not key.endswith("bias"):
                    raise KeyError(f"state dict lacks {key!r}")
                p.zero_()
                continue
            value = state_dict[key].float()
            p.copy_(value.t() if key.endswith(CONV1D_SUFFIXES) else value)
    return model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * factor)
    raise ValueError(f"size {size!r} must be an int or end in B, KB, MB or GB")


def _shards(state_dict: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into consecutive shards of at most max_bytes (a bigger tensor alone)."""
    shards, current, size = [], {}, 0
    for key, value in state_dict.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    shards.append(current)
    return shards


def save_hf_checkpoint(
    model,
    folder: str | Path,
    *,
    safetensors: bool = True,
    sharded: bool = False,
    max_shard_size: int | str | None = None,
    with_tokenizer: bool = False,
) -> Path:
    """Write `model` as an HF checkpoint folder; returns the folder.

    Parameters
    ----------
    model : transformers.GPT2LMHeadModel
    folder : str or Path
        Created if missing.
    safetensors : bool
        True: ``model.save_pretrained`` (model.safetensors). False: ``pytorch_model.bin``
        written with ``torch.save`` as transformers 4 did (transformers 5 only writes
        safetensors), ``transformer.``-prefixed keys, no tied lm_head.
    sharded : bool
        Split the weights into shards plus an ``*.index.json``.
    max_shard_size : int or str, optional
        Shard size (bytes or e.g. "200KB"); default: about a third of the weights, so a
        sharded checkpoint has three or four shards.
    with_tokenizer : bool
        Also write a byte-level BPE tokenizer trained on a tiny corpus, in both formats
        (tokenizer.json and vocab.json + merges.txt), see `train_tokenizer`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict()
    if max_shard_size is None:
        total = sum(v.numel() * v.element_size() for v in state_dict.values())
        max_shard_size = total // 3 + 1
    max_bytes = _parse_size(max_shard_size)
    if safetensors:
        model.save_pretrained(folder, max_shard_size=max_bytes if sharded else "50GB")
    else:
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        wte = state_dict["transformer.wte.weight"]
        state_dict = {
            k: v.detach().clone()
            for k, v in state_dict.items()
            if not (k == "lm_head.weight" and v.data_ptr() == wte.data_ptr())
        }
        if not sharded:
            torch.save(state_dict, folder / "pytorch_model.bin")
        else:
            shards = _shards(state_dict, max_bytes)
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
                torch.save(shard, folder / name)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state_dict.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    if with_tokenizer:
        train_tokenizer(folder, vocab_size=min(model.config.vocab_size, 600))
    return folder


def train_tokenizer(folder: str | Path, vocab_size: int) -> None:
    """Train a GPT-2-style byte-level BPE on `CORPUS`; write tokenizer.json, vocab.json, merges.txt.

    ``<|endoftext|>`` is a special token with id 0; the vocabulary has at most `vocab_size`
    ids (the 256 byte symbols, the special token, then merges while the corpus has pairs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json + merges.txt


def make_nanogpt_checkpoint(
    path: str | Path,
    *,
    n_layer: int,
    n_head: int,
    n_embd: int,
    block_size: int,
    vocab_size: int,
    bias: bool,
    compiled_prefix: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random checkpoint laid out as nanoGPT's train.py saves it; returns the path.

    The file holds ``model`` (state dict, ``nn.Linear`` weights (out, in), ``lm_head.weight``
    the same tensor as ``transformer.wte.weight``; keys prefixed ``_orig_mod.`` when
    `compiled_prefix`, as after ``torch.compile``), ``optimizer`` (AdamW state after one step),
    ``model_args``, ``iter_num``, ``best_val_loss`` and ``config``.
    """
    C, F4 = n_embd, 4 * n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab_size, C),
        "transformer.wpe.weight": (block_size, C),
    }

    def add(prefix, shape, with_bias):
        shapes[f"{prefix}.weight"] = shape
        if with_bias:
            shapes[f"{prefix}.bias"] = shape[:1]

    for i in range(n_layer):
        p = f"transformer.h.{i}"
        add(f"{p}.ln_1", (C,), bias)
        add(f"{p}.attn.c_attn", (3 * C, C), bias)
        add(f"{p}.attn.c_proj", (C, C), bias)
        add(f"{p}.ln_2", (C,), bias)
        add(f"{p}.mlp.c_fc", (F4, C), bias)
        add(f"{p}.mlp.c_proj", (C, F4), bias)
    add("transformer.ln_f", (C,), bias)

    params = {k: torch.nn.Parameter(torch.empty(s)) for k, s in shapes.items()}
    _random_(params, seed, conv1d=False)
    # One AdamW step, with nanoGPT's two groups (decay for matrices), so `optimizer` is real.
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4,
        betas=(0.9, 0.95),
    )
    with torch.random.fork_rng(devices=[]):
        optimizer.step()

    model = {k: p.detach() for k, p in params.items()}
    model["lm_head.weight"] = model["transformer.wte.weight"]  # tied: one storage
    if compiled_prefix:
        model = {f"_orig_mod.{k}": v for k, v in model.items()}
    model_args = dict(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
        bias=bias, vocab_size=vocab_size, dropout=0.0,
    )  # fmt: skip
    config = dict(
        out_dir="out", eval_interval=2000, eval_iters=200, init_from="scratch", dataset="openwebtext",
        gradient_accumulation_steps=40, batch_size=12, learning_rate=6e-4, max_iters=600000,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=True, device="cuda",
        dtype="bfloat16", compile=compiled_prefix, **model_args,
    )  # fmt: skip
    ckpt = {
        "model": model,
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 2000,
        "best_val_loss": torch.tensor(3.2815),
        "config": config,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def nanogpt_reference_logits(ckpt_path: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """nanoGPT's forward pass in plain fp32 torch, on every position.

    Parameters
    ----------
    ckpt_path : str or Path
        A nanoGPT checkpoint (see `make_nanogpt_checkpoint`).
    input_ids : torch.Tensor
        int64 ``(B, T)``, T <= block_size.

    Returns
    -------
    torch.Tensor
        float32 logits ``(B, T, vocab_size)``.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    args = ckpt["model_args"]
    sd = {k.removeprefix("_orig_mod."): v.float() for k, v in ckpt["model"].items()}
    B, T = input_ids.shape
    if T > args["block_size"]:
        raise ValueError(f"sequence length {T} exceeds block_size {args['block_size']}")
    C, nh = args["n_embd"], args["n_head"]
    hs = C // nh

    def ln(x, prefix):
        return F.layer_norm(x, (C,), sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"), 1e-5)

    def linear(x, prefix):
        return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))

    pos = torch.arange(T)
    x = sd["transformer.wte.weight"][input_ids] + sd["transformer.wpe.weight"][pos]  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = linear(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + linear(y, f"{p}.attn.c_proj")
        h = F.gelu(linear(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc"))  # exact erf GELU, like nn.GELU()
        x = x + linear(h, f"{p}.mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    return x @ sd["lm_head.weight"].t()  # (B, T, V)

"""Cases of the attention ops: `kv_cache_write`, `prefill_attention`, `decode_attention` (with the
append and the QKV bias), `decode_attention_partials`."""

from __future__ import annotations

import weakref

import torch

from gptfast.ops.attn_decode import (  # noqa: F401 (the runner times them, found by name)
    PARTIALS_MAX_SPLITS,
    decode_attention,
    decode_attention_partials,
    decode_attention_partials_ref,
    decode_attention_ref,
)
from gptfast.ops.attn_prefill import prefill_attention, prefill_attention_ref  # noqa: F401
from gptfast.ops.common import TOLERANCES
from gptfast.ops.kv_write import kv_cache_write, kv_cache_write_ref
from gptfast.ops.paged import gather_pages

from . import BenchCase, lazy_generator


def _random_paged_cache(batch, seq_len, heads, head_dim, block_size, dtype, device, gen):
    """A paged K/V cache holding `batch` sequences of `seq_len` tokens in shuffled pages.

    Returns k_cache, v_cache [num_blocks, bs, H, D], block_tables int32 [B, pages], and the same
    K/V contiguous as [B, seq_len, H, D] (for baselines).
    """
    pages = -(-seq_len // block_size)
    num_blocks = batch * pages + 1  # block 0 is the null block
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen, device=device).to(dtype)
    perm = torch.randperm(num_blocks - 1, generator=gen, device=device) + 1
    block_tables = perm.view(batch, pages).to(torch.int32)
    k = gather_pages(k_cache, block_tables)[:, :seq_len].contiguous()  # [B, T, H, D]
    v = gather_pages(v_cache, block_tables)[:, :seq_len].contiguous()
    return k_cache, v_cache, block_tables, k, v


class _BaselineInputs:
    """Tensors a baseline needs besides the op's args (e.g. a contiguous K/V copy), built in
    make_args so that building them is not timed, found again from the args' `q` by identity
    and dropped when that `q` is freed (the runner may keep many rotation buffers). A baseline
    carries its store as `.inputs`."""

    def __init__(self):
        self._by_q: dict[int, tuple] = {}

    def put(self, q: torch.Tensor, extra: tuple) -> None:
        self._by_q[id(q)] = extra
        weakref.finalize(q, self._by_q.pop, id(q), None)

    def get(self, q: torch.Tensor) -> tuple:
        return self._by_q[id(q)]



def _prefill_case(device, batch, seq_len, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """B sequences of `seq_len` new tokens, no cached prefix.

    The SDPA baseline gets the same args as the op; the contiguous K/V it runs on are built by
    make_args (not timed) and found from q.
    """
    contiguous_kv = _BaselineInputs()
    gen = lazy_generator(device, 1234 + seq_len)

    def make_args():
        k_cache, v_cache, block_tables, k, v = _random_paged_cache(
            batch, seq_len, heads, head_dim, block_size, dtype, device, gen()
        )
        q = torch.randn(batch * seq_len, heads, head_dim, generator=gen(), device=device).to(dtype)
        cu = torch.arange(0, batch * seq_len + 1, seq_len, device=device, dtype=torch.int32)
        lens = torch.full((batch,), seq_len, device=device, dtype=torch.int32)
        # [B, T, H, D] -> [B, H, T, D] views: the layout SDPA's flash kernel takes without a copy
        contiguous_kv.put(q, (k.transpose(1, 2), v.transpose(1, 2)))
        return (q, k_cache, v_cache, block_tables, cu, lens, head_dim**-0.5, seq_len)

    def sdpa(q, k_cache, v_cache, block_tables, cu, lens, scale, max_seqlen_q):
        k, v = contiguous_kv.get(q)
        qt = q.view(batch, seq_len, heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(batch * seq_len, heads, head_dim)  # [N, H, D]

    sdpa.inputs = contiguous_kv

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="prefill_attention",
        label=f"B={batch} T={seq_len} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=4 * batch * seq_len * heads * head_dim * e,
        flops=2 * batch * heads * seq_len * seq_len * head_dim,  # 4*B*H*T*T*D/2: the causal half
        params=dict(B=batch, T=seq_len, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        baselines={"sdpa": sdpa},
        **TOLERANCES[dtype],
    )


def _decode_case(device, batch, context, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """B sequences with `context` keys each. The SDPA baseline runs on the already-gathered
    contiguous cache [B, H, context, D] (built by make_args, not timed, and found from q).
    """
    contiguous_kv = _BaselineInputs()
    gen = lazy_generator(device, 4321 + context)

    def make_args():
        k_cache, v_cache, block_tables, k, v = _random_paged_cache(
            batch, context, heads, head_dim, block_size, dtype, device, gen()
        )
        q = torch.randn(batch, heads, head_dim, generator=gen(), device=device).to(dtype)
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        contiguous_kv.put(q, (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()))
        return (q, k_cache, v_cache, block_tables, lens, head_dim**-0.5)

    def sdpa(q, k_cache, v_cache, block_tables, lens, scale):
        k, v = contiguous_kv.get(q)  # [B, H, context, D]
        o = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale)
        return o.squeeze(2)  # [B, H, D]

    sdpa.inputs = contiguous_kv

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="decode_attention",
        label=f"B={batch} ctx={context} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=(2 * batch * context + 2 * batch) * heads * head_dim * e,
        flops=4 * batch * heads * context * head_dim,
        params=dict(B=batch, context=context, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        baselines={"sdpa": sdpa},
        **TOLERANCES[dtype],
    )


def _decode_append_case(device, batch, context, heads, head_dim, dtype, block_size=16, bias=False) -> BenchCase:
    """B sequences with `context` keys, the last of which (position context - 1) is the new token
    that the op appends; q, k_new and v_new are views of one [B, 3, H, D] projection output.

    Baseline "write_then_decode": the unfused step, `kv_cache_write` then `decode_attention`
    (the Triton launchers on CUDA, the references elsewhere), on the same args.
    With `bias` the args end with a QKV bias [3, H, D] that the op adds; baseline
    "add_then_append" instead adds it to the [B, 3, H, D] projection output in one elementwise
    kernel (out of place: the args stay unchanged), then runs the append without the bias.
    """
    gen = lazy_generator(device, 5678 + context + int(bias))
    on_cuda = device.startswith("cuda")
    projections = _BaselineInputs()  # the [B, 3, H, D] tensor that q, k_new, v_new view

    def make_args():
        g = gen()
        k_cache, v_cache, block_tables, _, _ = _random_paged_cache(
            batch, context, heads, head_dim, block_size, dtype, device, g
        )
        qkv = torch.randn(batch, 3, heads, head_dim, generator=g, device=device).to(dtype)  # [B, 3, H, D]
        pos = context - 1
        slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B]
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        args = (qkv[:, 0], k_cache, v_cache, block_tables, lens, head_dim**-0.5, qkv[:, 1], qkv[:, 2], slots)
        if not bias:
            return args
        projections.put(args[0], (qkv,))
        return (*args, torch.randn(3, heads, head_dim, generator=g, device=device).to(dtype))

    def write_then_decode(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots):
        write, attend = (kv_cache_write, decode_attention) if on_cuda else (kv_cache_write_ref, decode_attention_ref)
        write(k_new, v_new, k_cache, v_cache, slots)
        return attend(q, k_cache, v_cache, block_tables, lens, scale)

    def add_then_append(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots, qkv_bias):
        (qkv,) = projections.get(q)
        biased = qkv + qkv_bias  # [B, 3, H, D]
        attend = decode_attention if on_cuda else decode_attention_ref
        return attend(biased[:, 0], k_cache, v_cache, block_tables, lens, scale, biased[:, 1], biased[:, 2], slots)

    add_then_append.inputs = projections

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="decode_attention",
        label=(f"B={batch} ctx={context} H={heads} D={head_dim} bs={block_size} "
               f"{str(dtype).removeprefix('torch.')} +append" + ("+bias" if bias else "")),
        make_args=make_args,
        # cached K/V read; q, k_new, v_new read; the new K/V and the output written; the bias
        # (the same for every row) read once from DRAM
        bytes_moved=(2 * batch * (context - 1) + 6 * batch + 3 * bias) * heads * head_dim * e,
        flops=4 * batch * heads * context * head_dim,
        params=dict(B=batch, context=context, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype),
                    append=True, qkv_bias=bias),
        baselines={"add_then_append": add_then_append} if bias else {"write_then_decode": write_then_decode},
        **TOLERANCES[dtype],
    )


def _decode_partials_case(device, batch, context, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """The small-batch decode step's attention: `decode_attention_partials` with the append (the
    merge runs in the next kernel). Baseline "split_and_merge": `decode_attention` with the append,
    the split pass and its merge kernel (two launches) on the same args. Bytes as the append
    case plus the fp32 partials written (at most 8 splits)."""
    gen = lazy_generator(device, 6789 + context)
    on_cuda = device.startswith("cuda")

    def make_args():
        g = gen()
        k_cache, v_cache, block_tables, _, _ = _random_paged_cache(
            batch, context, heads, head_dim, block_size, dtype, device, g
        )
        qkv = torch.randn(batch, 3, heads, head_dim, generator=g, device=device).to(dtype)  # [B, 3, H, D]
        pos = context - 1
        slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B]
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        return (qkv[:, 0], k_cache, v_cache, block_tables, lens, head_dim**-0.5, qkv[:, 1], qkv[:, 2], slots)

    def split_and_merge(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots):
        attend = decode_attention if on_cuda else decode_attention_ref
        return attend(q, k_cache, v_cache, block_tables, lens, scale, k_new, v_new, slots)

    splits = PARTIALS_MAX_SPLITS  # the bound: the count needs the GPU's SM count (not asked here)
    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="decode_attention_partials",
        label=(f"B={batch} ctx={context} H={heads} D={head_dim} bs={block_size} "
               f"{str(dtype).removeprefix('torch.')} +append"),
        make_args=make_args,
        bytes_moved=(2 * batch * (context - 1) + 5 * batch) * heads * head_dim * e
        + 4 * batch * heads * splits * (head_dim + 2),
        flops=4 * batch * heads * context * head_dim,
        params=dict(B=batch, context=context, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        baselines={"split_and_merge": split_and_merge},
        atol=TOLERANCES[dtype]["atol"] * 10, rtol=TOLERANCES[dtype]["rtol"],
    )


def _kv_write_case(device, tokens, heads, head_dim, dtype, block_size=16) -> BenchCase:
    """`tokens` new K/V rows scattered to random distinct slots of a cache with room for them."""
    gen = lazy_generator(device, 99 + tokens)
    num_blocks = -(-tokens // block_size) * 2 + 1

    def make_args():
        g = gen()
        k = torch.randn(tokens, heads, head_dim, generator=g, device=device).to(dtype)
        v = torch.randn(tokens, heads, head_dim, generator=g, device=device).to(dtype)
        k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g, device=device).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g, device=device).to(dtype)
        slots = torch.randperm((num_blocks - 1) * block_size, generator=g, device=device)[:tokens]
        return (k, v, k_cache, v_cache, slots + block_size)  # never the null block

    e = torch.tensor([], dtype=dtype).element_size()
    return BenchCase(
        op="kv_cache_write",
        label=f"N={tokens} H={heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}",
        make_args=make_args,
        bytes_moved=2 * 2 * tokens * heads * head_dim * e,  # K and V, each read once and written once
        params=dict(N=tokens, H=heads, D=head_dim, block_size=block_size, dtype=str(dtype)),
        atol=0.0,
        rtol=0.0,
    )


def benchmark_cases(device: str, quick: bool) -> list[BenchCase]:
    """Prefill and decode configurations (GPT-2: H=12, D=64, block_size 16).

    kv_cache_write: N new tokens' K/V scattered into the cache (bytes = read + write).
    cuda: prefill B=4 (B*H=48) at T=128..1024 (and B=16 T=512) in fp16/bf16, FLOPs counted for
    the causal half; decode at contexts 128..4096 and batch 1..256 in bf16 (fp16 at one point),
    bytes = K/V read. cpu: one tiny fp32 case of each (the reference runs against itself or the
    interpreter). Baseline "sdpa" on both: prefill = SDPA's flash backend on [B, H, T, D] views
    of contiguous q/K/V; decode = SDPA (its own backend choice) on a contiguous, already gathered
    [B, H, context, D] cache. Decode with the K/V append fused ("+append", B 1..256 at context
    1024) has baseline "write_then_decode": the separate `kv_cache_write` and `decode_attention`
    launches it replaces. The same with the QKV bias fused as well ("+append+bias", what the
    model's decode step runs) has baseline "add_then_append": the bias added to the projection
    output by a separate elementwise kernel, then the append op. Baselines take the op's args;
    their extra inputs are built by make_args, so that setup is not timed. `decode_attention_partials`
    (the small-batch step's attention, its merge done by the next kernel) at B 1 and 8, context
    384 (the batch-1 benchmark's 128 + 256 tokens; full: also B=1 at 1024), has baseline "split_and_merge":
    `decode_attention` with the append, split pass + merge kernel.
    """
    if device == "cpu":
        return [
            _prefill_case("cpu", 2, 32, 2, 16, torch.float32, block_size=8),
            _decode_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8),
            _decode_append_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8),
            _decode_append_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8, bias=True),
            _kv_write_case("cpu", 5, 2, 16, torch.float32, block_size=8),
            _decode_partials_case("cpu", 2, 40, 2, 16, torch.float32, block_size=8),
        ]
    fp16, bf16 = torch.float16, torch.bfloat16
    if quick:
        prefill = [(4, 1024, fp16), (4, 1024, bf16), (4, 128, bf16)]
        decode = [(1, 1024, bf16), (8, 1024, bf16), (64, 1024, bf16), (1, 4096, bf16), (256, 1024, bf16)]
        append = [1, 256]
    else:
        prefill = [(4, t, dt) for dt in (fp16, bf16) for t in (128, 512, 1024)] + [(16, 512, bf16)]
        decode = [(b, c, bf16) for c in (128, 1024, 4096) for b in (1, 8, 64, 256) if b * c <= 256 * 1024]
        decode += [(8, 1024, fp16)]
        append = [1, 64, 256]
    cases = [_prefill_case(device, b, t, 12, 64, dt) for b, t, dt in prefill]
    cases += [_decode_case(device, b, c, 12, 64, dt) for b, c, dt in decode]
    # the decode step as the model runs it: K/V append fused, against write + decode
    cases += [_decode_append_case(device, b, 1024, 12, 64, bf16, bias=bias) for bias in (False, True) for b in append]
    # the decode step's append (one token per sequence) and a prefill's (whole prompts)
    cases += [_kv_write_case(device, n, 12, 64, bf16) for n in ((256, 8192) if quick else (1, 256, 8192))]
    # the small-batch step's attention: partials only, the merge folded into the out-projection
    partials = ((1, 384), (8, 384)) + (() if quick else ((1, 1024),))
    cases += [_decode_partials_case(device, b, c, 12, 64, bf16) for b, c in partials]
    return cases

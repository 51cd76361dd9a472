"""gptfast's ops: one op per file, each with its Triton kernel(s), launcher and eager reference.

An op `name` lives in `gptfast/ops/<file>.py` as the launcher `name` and the reference
`name_ref` (same signature; an in-place op `name_` has the reference `name_ref_`, see
`common.ref_name`). This package exposes the dispatched op under `name`: CUDA tensors go to
Triton, CPU tensors to the reference (see `common.use_triton`).

Files: `kv_write` (kv_cache_write), `attn_prefill` (prefill_attention), `attn_decode`
(decode_attention, decode_attention_partials), `layernorm` (add_layernorm, embed_layernorm),
`gelu` (bias_gelu_, linear_gelu), `sampling` (sample), `decode_inputs` (decode_inputs_),
`quant_linear` (int8_linear), `packed_linear` (the CPU linear on a prepacked weight: no kernel,
the model calls it directly), `cpu_linear` (the CPU decode linear on panel-packed int8 weights:
a C++ kernel, gptfast._cpu) and the small-batch GEMV ops `ln_linear` (layernorm_linear,
embed_layernorm_linear), `proj_residual` (linear_residual, attn_merge_linear_residual),
`head_argmax` (layernorm_head_argmax). Shared pieces: `checks` (launcher checks), `paged` (the
K/V layout of the attention ops), `gemv` (the GEMV ops' helpers and tiling), `common` (backend
choice, comparison). The benchmark cases are in `gptfast.bench.op_cases`.
"""

from . import (  # noqa: F401
    attn_decode,
    attn_prefill,
    cpu_linear,
    decode_inputs,
    gelu,
    gemv,
    head_argmax,
    kv_write,
    layernorm,
    ln_linear,
    packed_linear,
    proj_residual,
    quant_linear,
    sampling,
)
from .common import as_cuda, backend, dispatch, gemv_decode_enabled, kernel_backend, on_cuda, use_triton  # noqa: F401

kv_cache_write = dispatch(kv_write.kv_cache_write, kv_write.kv_cache_write_ref)
prefill_attention = dispatch(attn_prefill.prefill_attention, attn_prefill.prefill_attention_ref)
decode_attention = dispatch(attn_decode.decode_attention, attn_decode.decode_attention_ref)
sample = dispatch(sampling.sample, sampling.sample_ref)
filter_logits = sampling.filter_logits_ref  # eager only: the sampling kernel filters without writing the scores out
decode_inputs_ = dispatch(decode_inputs.decode_inputs_, decode_inputs.decode_inputs_ref_)

add_layernorm = dispatch(layernorm.add_layernorm, layernorm.add_layernorm_ref)
embed_layernorm = dispatch(layernorm.embed_layernorm, layernorm.embed_layernorm_ref)
linear_gelu = dispatch(gelu.linear_gelu, gelu.linear_gelu_ref)
bias_gelu_ = dispatch(gelu.bias_gelu_, gelu.bias_gelu_ref_)
int8_linear = dispatch(quant_linear.int8_linear, quant_linear.int8_linear_ref)

# the small-batch (GEMV) decode step: LN -> linear, linear + residual (with the attention merge),
# split-KV partials, greedy head
layernorm_linear = dispatch(ln_linear.layernorm_linear, ln_linear.layernorm_linear_ref)
embed_layernorm_linear = dispatch(ln_linear.embed_layernorm_linear, ln_linear.embed_layernorm_linear_ref)
linear_residual = dispatch(proj_residual.linear_residual, proj_residual.linear_residual_ref)
attn_merge_linear_residual = dispatch(proj_residual.attn_merge_linear_residual,
                                      proj_residual.attn_merge_linear_residual_ref)
decode_attention_partials = dispatch(attn_decode.decode_attention_partials, attn_decode.decode_attention_partials_ref)
layernorm_head_argmax = dispatch(head_argmax.layernorm_head_argmax, head_argmax.layernorm_head_argmax_ref)

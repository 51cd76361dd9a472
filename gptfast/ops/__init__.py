"""gptfast's ops: each file holds a Triton kernel, its launcher and its eager reference.

An op `name` lives in `gptfast/ops/<file>.py` as the launcher `name` and the reference
`name_ref` (same signature). This package exposes the dispatched op under `name`: CUDA tensors
go to Triton, CPU tensors to the reference (see `common.use_triton`).
"""

from . import attention, decode_inputs, gemv, head_argmax, ln_linear, norm, proj_residual, quant_linear, sampling  # noqa: F401
from .common import as_cuda, backend, dispatch, kernel_backend, on_cuda, use_triton  # noqa: F401

kv_cache_write = dispatch(attention.kv_cache_write, attention.kv_cache_write_ref)
prefill_attention = dispatch(attention.prefill_attention, attention.prefill_attention_ref)
decode_attention = dispatch(attention.decode_attention, attention.decode_attention_ref)
sample = dispatch(sampling.sample, sampling.sample_ref)
filter_logits = sampling.filter_logits_ref  # eager only: the sampling kernel filters without writing the scores out
decode_inputs_ = dispatch(decode_inputs.decode_inputs_, decode_inputs.decode_inputs__ref)

add_layernorm = dispatch(norm.add_layernorm, norm.add_layernorm_ref)
embed_layernorm = dispatch(norm.embed_layernorm, norm.embed_layernorm_ref)
linear_gelu = dispatch(norm.linear_gelu, norm.linear_gelu_ref)
bias_gelu_ = dispatch(norm.bias_gelu_, norm.bias_gelu__ref)
int8_linear = dispatch(quant_linear.int8_linear, quant_linear.int8_linear_ref)

# the small-batch (GEMV) decode step: LN -> linear, linear + residual (with the attention merge),
# split-KV partials, greedy head
layernorm_linear = dispatch(ln_linear.layernorm_linear, ln_linear.layernorm_linear_ref)
embed_layernorm_linear = dispatch(ln_linear.embed_layernorm_linear, ln_linear.embed_layernorm_linear_ref)
linear_residual = dispatch(proj_residual.linear_residual, proj_residual.linear_residual_ref)
attn_merge_linear_residual = dispatch(proj_residual.attn_merge_linear_residual,
                                      proj_residual.attn_merge_linear_residual_ref)
decode_attention_partials = dispatch(attention.decode_attention_partials, attention.decode_attention_partials_ref)
layernorm_head_argmax = dispatch(head_argmax.layernorm_head_argmax, head_argmax.layernorm_head_argmax_ref)

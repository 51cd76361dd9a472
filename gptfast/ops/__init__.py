"""gptfast's ops: each file holds a Triton kernel, its launcher and its eager reference.

An op `name` lives in `gptfast/ops/<file>.py` as the launcher `name` and the reference
`name_ref` (same signature). This package exposes the dispatched op under `name`: CUDA tensors
go to Triton, CPU tensors to the reference (see `common.use_triton`).
"""

from . import attention, decode_inputs, norm, sampling
from .common import dispatch, kernel_backend, use_triton  # noqa: F401

kv_cache_write = dispatch(attention.kv_cache_write, attention.kv_cache_write_ref)
prefill_attention = dispatch(attention.prefill_attention, attention.prefill_attention_ref)
decode_attention = dispatch(attention.decode_attention, attention.decode_attention_ref)
sample = dispatch(sampling.sample, sampling.sample_ref)
decode_inputs_ = dispatch(decode_inputs.decode_inputs_, decode_inputs.decode_inputs__ref)

add_layernorm = dispatch(norm.add_layernorm, norm.add_layernorm_ref)
embed_layernorm = dispatch(norm.embed_layernorm, norm.embed_layernorm_ref)
linear_gelu = dispatch(norm.linear_gelu, norm.linear_gelu_ref)
bias_gelu_ = dispatch(norm.bias_gelu_, norm.bias_gelu__ref)

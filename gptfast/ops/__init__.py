"""gptfast's ops: each file holds a Triton kernel, its launcher and its eager reference.

An op `name` lives in `gptfast/ops/<file>.py` as the launcher `name` and the reference
`name_ref` (same signature). This package exposes the dispatched op under `name`: CUDA tensors
go to Triton, CPU tensors to the reference (see `common.use_triton`).
"""

from .common import dispatch, kernel_backend, use_triton  # noqa: F401

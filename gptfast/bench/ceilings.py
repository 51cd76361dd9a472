"""The two ceilings every "% of floor" is computed against, measured once per run.

- bandwidth: a large device-to-device copy, (bytes read + bytes written) / time.
- compute: a large matmul's rate, bf16 on CUDA, fp32 on the CPU.

Percentages use these measured numbers, never datasheet numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Ceilings:
    device: str
    copy_gbps: float  # measured copy bandwidth, GB/s (1e9 bytes), read + write
    matmul_tflops: float  # measured matmul rate, TFLOP/s
    matmul_dtype: str  # "bfloat16" on CUDA, "float32" on the CPU
    copy_bytes: int  # size of the copied buffer (one direction)
    matmul_n: int  # N of the N×N×N product

    def floor_us(self, bytes_moved: int, flops: int) -> tuple[float, str]:
        """The larger of bytes/bandwidth and flops/peak in µs, and which one it is ("memory"/"compute")."""
        t_mem = bytes_moved / (self.copy_gbps * 1e9) * 1e6
        t_flop = flops / (self.matmul_tflops * 1e12) * 1e6
        return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")

    def as_dict(self) -> dict:
        return asdict(self)


def measure(device: str, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and matmul rate on `device` ("cuda", "cuda:0" or "cpu").

    On CUDA: a 1 GiB copy (256 MiB with `quick`), far larger than L2, timed with CUDA events via
    `timing.time_cuda`; an 8192³ bf16 matmul (always: smaller ones stay below the peak). On the CPU: a 256 MiB copy and
    a 1024³ fp32 matmul, wall-clock medians. Inputs are random, never zeros.
    """
    import torch

    from .timing import time_cpu, time_cuda

    if device.startswith("cuda"):
        nbytes = (256 if quick else 1024) << 20
        n, dtype, timer = 8192, torch.bfloat16, time_cuda  # smaller runs below the peak
    else:
        # 256 MiB each way: well past any L3, so the copy measures DRAM
        nbytes, n, dtype, timer = 256 << 20, 1024, torch.float32, time_cpu
    # Drawn on the device itself (a 1 GiB randn on the host is slow), from a private generator.
    gen = torch.Generator(device=device).manual_seed(1234)
    src = torch.randn(nbytes // 4, generator=gen, device=device)
    dst = torch.empty_like(src)
    copy_us = timer(lambda: dst.copy_(src))
    src = dst = None  # freed before the matmul's operands are drawn
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    matmul_us = timer(lambda: torch.mm(a, b))
    return Ceilings(
        device=device,
        copy_gbps=2 * nbytes / (copy_us * 1e-6) / 1e9,
        matmul_tflops=2 * n**3 / (matmul_us * 1e-6) / 1e12,
        matmul_dtype=str(dtype).replace("torch.", ""),
        copy_bytes=nbytes,
        matmul_n=n,
    )

"""Choosing a numeric precision: ``precision=auto`` picks what is fast on this hardware."""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# bfloat16 must beat float32 by this factor on the CPU before auto prefers it: below
# that, its rounding is not worth the time.
CPU_BF16_MIN_SPEEDUP = 1.5


def matmul_gflops(
    dtype: torch.dtype, m: int = 192, k: int = 768, n: int = 3072, seconds: float = 0.1
) -> float:
    """GFLOP/s of an (m x k) @ (k x n) linear layer in ``dtype`` on the CPU."""
    # A private generator: a probe that runs once per process must not move the global
    # RNG, or the data order would differ between a sweep's first job and its others.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)
    F.linear(x, w)  # warm-up: kernel selection and allocation
    repeats, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or repeats < 1:
        F.linear(x, w)
        repeats += 1
    return 2 * m * k * n * repeats / elapsed / 1e9


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster bfloat16 matrix products run than float32 on this CPU."""
    return matmul_gflops(torch.bfloat16) / matmul_gflops(torch.float32)


def resolve_precision(accelerator: str, precision: str | int) -> str:
    """Lightning precision for ``precision=auto``.

    CUDA: bf16-mixed where supported, else 16-mixed. CPU: bf16-mixed only where a short
    probe finds bfloat16 matrix products at least 1.5x faster than float32 (true of
    CPUs with AMX; on a 2-core AVX512-BF16 Xeon they ran at 0.6x), else 32-true.
    Apple's MPS: 32-true.
    """
    if str(precision) != "auto":
        return str(precision)
    kind = accelerator
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "gpu"
        elif torch.backends.mps.is_available():
            kind = "mps"
        else:
            kind = "cpu"
    if kind in ("gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if kind == "cpu":
        speedup = cpu_bf16_speedup()
        chosen = "bf16-mixed" if speedup >= CPU_BF16_MIN_SPEEDUP else "32-true"
        log.info("precision=auto on this CPU: bfloat16 runs %.2fx float32 -> %s", speedup, chosen)
        return chosen
    return "32-true"

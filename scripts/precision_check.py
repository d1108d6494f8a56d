"""Compare float32 and bfloat16 matrix-product speed on this machine's CPU.

The number behind ``precision=auto`` choosing 32-true on CPUs:
    python scripts/precision_check.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def gflops(
    dtype: torch.dtype, m: int = 960, k: int = 768, n: int = 3072, repeats: int = 20
) -> float:
    """GFLOP/s of an (m x k) @ (k x n) linear layer in ``dtype``."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    F.linear(x, w)  # warm-up: kernel selection and allocation
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, w)
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


if __name__ == "__main__":
    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)
    print(
        f"threads={torch.get_num_threads()} "
        f"cpu_capability={torch.backends.cpu.get_cpu_capability()}"
    )
    print("| dtype | GFLOP/s (960x768x3072) |\n|---|---|")
    print(f"| float32 | {fp32:.0f} |\n| bfloat16 | {bf16:.0f} |")
    print(f"bfloat16 / float32 = {bf16 / fp32:.2f}")

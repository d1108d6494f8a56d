"""Compare float32 and bfloat16 matrix-product speed on this machine's CPU.

The probe behind ``precision=auto`` on CPUs, with a longer measurement:
    python scripts/precision_check.py
"""

from __future__ import annotations

import torch

from gpt_classifier.training.precision import CPU_BF16_MIN_SPEEDUP, matmul_gflops

if __name__ == "__main__":
    fp32 = matmul_gflops(torch.float32, m=960, seconds=2.0)
    bf16 = matmul_gflops(torch.bfloat16, m=960, seconds=2.0)
    print(f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}")
    print("| dtype | GFLOP/s (960x768x3072 linear) |\n|---|---|")
    print(f"| float32 | {fp32:.0f} |\n| bfloat16 | {bf16:.0f} |")
    choice = "bf16-mixed" if bf16 / fp32 >= CPU_BF16_MIN_SPEEDUP else "32-true"
    print(f"bfloat16 / float32 = {bf16 / fp32:.2f} -> precision=auto picks {choice}")

"""Choosing a numeric precision: ``precision=auto`` picks what is fast on this hardware."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX).

    Without AMX, oneDNN's bfloat16 products are no faster than float32 ones on a CPU
    (AVX512-BF16 included), and bfloat16 only adds rounding.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so the safe choice
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split()
               for line in cpuinfo.splitlines())  # fmt: skip


def resolve_precision(accelerator: str, precision: str | int) -> str:
    """Lightning precision for ``precision=auto``.

    CUDA: bf16-mixed where supported, else 16-mixed. CPU: bf16-mixed on CPUs with
    bfloat16 matrix units (AMX), else 32-true. Apple's MPS: 32-true.
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
        amx = cpu_has_bf16_matrix_units()
        chosen = "bf16-mixed" if amx else "32-true"
        log.info("precision=auto on this CPU (%s AMX) -> %s", "with" if amx else "without", chosen)
        return chosen
    return "32-true"

"""Choosing a numeric precision: ``precision=auto`` picks what is fast on this hardware."""

from __future__ import annotations

import functools
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpt_classifier.files import write_text_atomically

log = logging.getLogger(__name__)

# bfloat16 must beat float32 by this factor on the CPU before auto prefers it: below
# that, its rounding is not worth the time.
CPU_BF16_MIN_SPEEDUP = 1.5
# The file in the cache folder (paths.cache_dir) that keeps each machine's measurement.
PRECISION_RECORD = "cpu_precision.json"


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


def measure_cpu_bf16_speedup(rounds: int = 3, seconds: float = 0.05) -> float:
    """How many times faster bfloat16 matrix products run than float32 on this CPU.

    The two alternate, and each keeps its best round: another process taking the cores
    for a moment slows one round, not the ratio (with one round each, one of three runs
    started together in CI measured below 1.5x and trained in float32, the others in
    bfloat16)."""
    best = {torch.bfloat16: 0.0, torch.float32: 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_gflops(dtype, seconds=seconds))
    return best[torch.bfloat16] / best[torch.float32]


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_signature() -> str:
    """What the probe's answer depends on: the CPU model, the threads torch uses and
    torch's version (one record file may serve the several kinds of node of a cluster)."""
    model = cpu_model()
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model}; {capability}; {torch.get_num_threads()} threads; torch {torch.__version__}"


@functools.cache
def cpu_bf16_speedup(record: Path | None = None) -> float:
    """The bfloat16 speedup of this CPU, measured once per machine when ``record`` (a
    JSON file) is given: later processes read it there, so that every run on one
    machine makes the same choice, whatever else the machine is doing at its start."""
    signature = cpu_signature()
    known: dict[str, Any] = {}
    if record is not None and record.is_file():
        try:
            known = json.loads(record.read_text())
            if not isinstance(known, dict):
                raise ValueError("not a JSON object")
            entry = known.get(signature)
            speedup = None if entry is None else float(entry["bf16_speedup"])
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.warning("%s is not a precision record (%s): measuring again", record, err)
            known, speedup = {}, None
        if speedup is not None:
            return speedup
    speedup = measure_cpu_bf16_speedup()
    if record is not None:
        known[signature] = {"bf16_speedup": round(speedup, 3)}
        try:
            write_text_atomically(record, json.dumps(known, indent=1) + "\n")
        except OSError as err:  # an unwritable cache costs a measurement per run, not the run
            log.warning("precision=auto: could not keep the measurement in %s (%s)", record, err)
    return speedup


def resolve_precision(accelerator: str, precision: str | int, record: Path | None = None) -> str:
    """Lightning precision for ``precision=auto``.

    CUDA: bf16-mixed from Ampere on (and on ROCm), else 16-mixed. CPU: bf16-mixed only where a short
    probe finds bfloat16 matrix products ``CPU_BF16_MIN_SPEEDUP`` times faster than
    float32 (a CPU's flags do not tell: see docs/benchmarks.md), else 32-true; the probe
    runs once per machine when ``record`` names a file to keep its answer in.
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
        # Not torch.cuda.is_bf16_supported(): it says yes on Turing and Volta (a T4, a
        # V100), which only emulate bfloat16, at a fraction of float16's speed.
        native = torch.cuda.is_available() and (
            torch.version.hip is not None or torch.cuda.get_device_capability()[0] >= 8
        )
        return "bf16-mixed" if native else "16-mixed"
    if kind == "cpu":
        speedup = cpu_bf16_speedup(record)
        chosen = "bf16-mixed" if speedup >= CPU_BF16_MIN_SPEEDUP else "32-true"
        where = f" (measured once, kept in {record}; delete it to measure again)" if record else ""
        log.info("precision=auto on this CPU: bfloat16 runs %.2fx float32%s -> %s",
                 speedup, where, chosen)  # fmt: skip
        return chosen
    return "32-true"

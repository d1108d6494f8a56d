"""precision=auto: bf16-mixed only where the hardware makes it pay."""

from __future__ import annotations

import pytest
import torch

from gpt_classifier.training import precision


def test_explicit_precision_is_kept():
    assert precision.resolve_precision("cpu", "bf16-mixed") == "bf16-mixed"
    assert precision.resolve_precision("cuda", "32-true") == "32-true"


@pytest.mark.parametrize(
    ("speedup", "expected"),
    [(0.6, "32-true"), (1.4, "32-true"), (1.5, "bf16-mixed"), (4.5, "bf16-mixed")],
)
def test_cpu_auto_follows_the_measured_speedup(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.resolve_precision("cpu", "auto") == expected


def test_probe_measures_something():
    assert precision.matmul_gflops(precision.torch.float32, m=64, k=64, n=64, seconds=0.01) > 0


def test_probe_leaves_the_global_rng_alone():
    """It runs once per process: drawing from the global RNG would make a sweep's first
    job shuffle its data differently from the same job run later or alone."""
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    precision.matmul_gflops(torch.float32, m=8, k=8, n=8, seconds=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)

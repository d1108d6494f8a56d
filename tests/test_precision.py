"""precision=auto: bf16-mixed only where the hardware makes it pay."""

from __future__ import annotations

import json

import pytest
import torch

from gpt_classifier.training import precision


def test_explicit_precision_is_kept():
    assert precision.resolve_precision("cpu", "bf16-mixed") == "bf16-mixed"
    assert precision.resolve_precision("cuda", "32-true") == "32-true"


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 0), "16-mixed"), ((7, 5), "16-mixed"), ((8, 0), "bf16-mixed"),
                                 ((9, 0), "bf16-mixed")],
)  # fmt: skip
def test_cuda_auto_takes_bfloat16_only_where_the_gpu_computes_in_it(monkeypatch, capability,
                                                                    expected):  # fmt: skip
    """A V100 or T4 (7.x) emulates bfloat16, although torch.cuda.is_bf16_supported() is
    true there: float16 mixed precision is the fast choice."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert precision.resolve_precision("cuda", "auto") == expected
    assert precision.resolve_precision("gpu", "auto") == expected


@pytest.mark.parametrize(
    ("speedup", "expected"),
    [(0.6, "32-true"), (1.4, "32-true"), (1.5, "bf16-mixed"), (4.5, "bf16-mixed")],
)
def test_cpu_auto_follows_the_measured_speedup(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda record=None: speedup)
    assert precision.resolve_precision("cpu", "auto") == expected


def test_probe_leaves_the_global_rng_alone():
    """It runs once per process: drawing from the global RNG would make a sweep's first
    job shuffle its data differently from the same job run later or alone."""
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    precision.matmul_gflops(torch.float32, m=8, k=8, n=8, seconds=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_cpu_auto_measures_once_per_machine(monkeypatch, tmp_path, caplog):
    """Every run on one machine makes the same choice: the first measures and keeps the
    answer, later processes read it (a measurement under load once chose float32 for
    one of three runs started together); a broken record is measured again."""
    measured = []

    def measure() -> float:
        measured.append(1)
        return 2.5

    monkeypatch.setattr(precision, "measure_cpu_bf16_speedup", measure)
    caplog.set_level("INFO", logger=precision.log.name)
    record = tmp_path / "cache" / precision.PRECISION_RECORD
    precision.cpu_bf16_speedup.cache_clear()
    try:
        assert precision.resolve_precision("cpu", "auto", record) == "bf16-mixed"
        assert len(measured) == 1 and record.is_file()
        precision.cpu_bf16_speedup.cache_clear()  # as a new process would start
        entries = json.loads(record.read_text())
        entries["another CPU; AVX2; 8 threads; torch 2.13.0"] = {"bf16_speedup": 0.6}
        record.write_text(json.dumps(entries))
        assert precision.resolve_precision("cpu", "auto", record) == "bf16-mixed"
        assert len(measured) == 1  # read, not measured
        assert "kept in" in caplog.text and str(record) in caplog.text

        precision.cpu_bf16_speedup.cache_clear()
        record.write_text("{not json")
        assert precision.resolve_precision("cpu", "auto", record) == "bf16-mixed"
        assert len(measured) == 2 and "is not a precision record" in caplog.text
        assert json.loads(record.read_text()) == {precision.cpu_signature(): {"bf16_speedup": 2.5}}
        # Another machine's answer stays when this one's is added.
        precision.cpu_bf16_speedup.cache_clear()
        record.write_text(json.dumps({"another CPU": {"bf16_speedup": 0.6}}))
        precision.resolve_precision("cpu", "auto", record)
        assert set(json.loads(record.read_text())) == {"another CPU", precision.cpu_signature()}
    finally:
        precision.cpu_bf16_speedup.cache_clear()


def test_the_measurement_keeps_each_dtypes_best_round(monkeypatch):
    """A round slowed by another process does not decide: each dtype's best round does."""
    rounds = iter([10.0, 20.0, 40.0, 20.0, 40.0, 5.0])  # bf16, fp32 alternating
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, seconds: next(rounds))
    assert precision.measure_cpu_bf16_speedup(rounds=3) == 40.0 / 20.0

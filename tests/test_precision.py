"""precision=auto: bf16-mixed only where the hardware makes it pay."""

from __future__ import annotations

import pytest

from gpt_classifier.training import precision


def test_explicit_precision_is_kept():
    assert precision.resolve_precision("cpu", "bf16-mixed") == "bf16-mixed"
    assert precision.resolve_precision("cuda", "32-true") == "32-true"


@pytest.mark.parametrize(("amx", "expected"), [(False, "32-true"), (True, "bf16-mixed")])
def test_cpu_auto_takes_bfloat16_only_with_matrix_units(monkeypatch, amx, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16_matrix_units", lambda: amx)
    assert precision.resolve_precision("cpu", "auto") == expected


def test_amx_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    flags = {"plain": "flags\t: fpu avx2 avx512f avx512_bf16\n",
             "amx": "flags\t: fpu avx2 amx_bf16 amx_tile\n"}  # fmt: skip
    real_path = precision.Path
    for name, text in flags.items():
        (tmp_path / name).write_text("processor\t: 0\n" + text)
    for name, expected in (("plain", False), ("amx", True)):
        monkeypatch.setattr(precision, "Path", lambda _, n=name: real_path(tmp_path / n))
        assert precision.cpu_has_bf16_matrix_units() is expected

"""Every feature on a dataset of our own with three classes (``data=files``): a ddp_sim
sweep with one summary and the persisted prefix cache, exact resume after kill -9, and
the trained model through transformers' pipeline, ONNX Runtime and the server."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from entry_points import ok, run_entry
from test_own_data import LABELS, three_classes, write_csv
from test_resume import command, curves, final_metrics, interrupt_at
from test_serving import predict, request, start_server, stop_group

from gpt_classifier.inference import TextClassifier


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, sms_file) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "three.csv", three_classes(sms_file)[:1500])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_file) -> tuple[Path, Path, str]:
    """Two jobs under trainer=ddp_sim, ranked by val/f1_macro: (sweep folder, cache
    folder, output)."""
    root = tmp_path_factory.mktemp("sweep")
    result = ok(run_entry(
        "train.py", "-m", f"hydra.sweep.dir={root / 'sweep'}", "model=gpt2-tiny",
        "accelerator=cpu", "data=files", f"data.path={data_file}", "trainer=ddp_sim",
        "optimize_metric=val/f1_macro", "optimizer.lr=1e-4,5e-4", "trainer.max_epochs=1",
        "trainer.precision=32-true", f"paths.cache_dir={root / 'cache'}",
        "callbacks.progress_bar.refresh_rate=0",
    ))  # fmt: skip
    return root / "sweep", root / "cache", result.stdout + result.stderr


def test_a_ddp_sim_sweep_is_one_sweep_with_per_class_metrics_and_a_reused_prefix(sweep):
    folder, cache, output = sweep
    assert output.count("Launching 2 jobs") == 1
    with (folder / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["overrides"] for row in rows] == ["optimizer.lr=0.0001", "optimizer.lr=0.0005"]
    for row in rows:
        assert {f"test/class/{label}/f1" for label in LABELS} <= row.keys()
    table = (folder / "summary.md").read_text()
    assert "Sorted by `val/f1_macro`" in table and "/class/" not in table
    ranked = [line for line in table.splitlines() if line.startswith("| ")][1:]
    best = max(rows, key=lambda row: float(row["val/f1_macro"]))
    assert ranked[0].startswith(f"| **best** | {best['job']} |")
    for job in ("0", "1"):
        metrics = json.loads((folder / job / "metrics.json").read_text())
        # Each message once across the two processes, and the counts add up per class.
        assert sum(metrics[f"{split}/examples"] for split in ("train", "val", "test")) == 1500
        for split in ("train", "val", "test"):
            supports = [metrics[f"{split}/class/{label}/support"] for label in LABELS]
            assert sum(supports) == metrics[f"{split}/examples"] and min(supports) > 0
        for split in ("val", "test"):
            assert (folder / job / f"confusion_matrix_{split}.png").is_file()
        # The best checkpoint is chosen by optimize_metric.
        stored = torch.load(folder / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert any("'monitor': 'val/f1_macro', 'mode': 'max'" in key for key in stored["callbacks"])
    # The first job computed the frozen prefix (half in each process) and kept it on disk;
    # the second read it whole from there.
    [kept] = (cache / "prefix_cache").glob("prefix-*.safetensors")
    assert "process 0 of 2: computed 726 of 1452" in (folder / "0" / "train.log").read_text()
    assert f"reused 1452 of 1452 messages from {kept}" in (folder / "1" / "train.log").read_text()


def test_kill_9_then_resume_equals_the_uninterrupted_run(data_file, tmp_path):
    """One epoch, killed 20 steps in (test_resume.py kills the SMS run in its second)."""
    args = ("data=files", "freeze=lora", "freeze.blocks=1")
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    ok(run_entry(*command(data_file, reference, *args, epochs=1)))
    process = interrupt_at(command(data_file, run_dir, *args, epochs=1), run_dir, 20,
                           signal.SIGKILL)  # fmt: skip
    assert process.wait(timeout=60) == -signal.SIGKILL
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert final_metrics(run_dir) == final_metrics(reference)
    assert curves(run_dir) == curves(reference)
    assert "test/class/short/f1" in final_metrics(run_dir)


def test_exports_to_transformers_and_onnx_give_our_probabilities_by_name(sweep, tmp_path):
    from transformers import pipeline

    run_dir = sweep[0] / "0"
    with (run_dir / "splits" / "test.csv").open(encoding="utf-8", newline="") as f:
        texts = [row["Text"] for row in csv.DictReader(f)][:32]
    ours = TextClassifier.load(run_dir)
    assert ours.settings.label_names == LABELS
    want = ours.probabilities(texts)
    for fmt in ("hf", "onnx"):
        ok(run_entry("export.py", f"ckpt_path={run_dir}", f"out={tmp_path / fmt}",
                     f"format={fmt}", f"hydra.run.dir={tmp_path / 'hydra'}"))  # fmt: skip
    classify = pipeline("text-classification", model=str(tmp_path / "hf"), top_k=None,
                        truncation=True, device="cpu")  # fmt: skip
    results = classify(texts, batch_size=8)
    theirs = torch.tensor([[next(r["score"] for r in scores if r["label"] == name)
                            for name in LABELS] for scores in results])  # fmt: skip
    torch.testing.assert_close(theirs, want, atol=1e-5, rtol=0)
    onnx = TextClassifier.load(tmp_path / "onnx")
    assert onnx.settings.label_names == LABELS
    torch.testing.assert_close(onnx.probabilities(texts), want, atol=1e-5, rtol=0)


def test_the_server_answers_with_the_three_label_names(sweep, tmp_path):
    pytest.importorskip("litserve")
    run_dir = sweep[0] / "0"
    process, url, _ = start_server(run_dir, tmp_path)
    try:
        status, info = request(f"{url}/info")
        assert status == 200 and info["model"]["labels"] == LABELS
        status, answer = predict(url, {"texts": ["Call now to win a prize", "ok see you"]})
        assert status == 200, answer
        want = TextClassifier.load(run_dir).classify(["Call now to win a prize", "ok see you"])
        for got, expected in zip(answer["predictions"], want):
            assert got["label"] == expected.label and list(got["probabilities"]) == LABELS
            for name in LABELS:
                assert got["probabilities"][name] == pytest.approx(
                    expected.probabilities[name], abs=1e-6)  # fmt: skip
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            stop_group(process)


def test_fsdp_with_class_weights_auto_reaches_its_final_evaluation(data_file, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """The test stage's new module under FSDP is built with the training split's class
    counts (it once got the parameter counts, and failed after training)."""
    from test_distributed import CPU_FSDP

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    ok(run_entry("train.py", f"hydra.run.dir={tmp_path / 'run'}", "model=gpt2-tiny",
                 "data=files", f"data.path={data_file}", "classifier.class_weights=auto",
                 "freeze=all", "trainer.precision=32-true", "trainer.limit_train_batches=2",
                 "trainer.max_epochs=1", f"paths.cache_dir={tmp_path / 'cache'}",
                 *CPU_FSDP))  # fmt: skip
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/examples"] > 0

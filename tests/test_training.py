"""The training app through its real entry point, and the classifier's guarantees."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt_classifier import GPT
from gpt_classifier.batching import Collator
from gpt_classifier.classifier import GPTClassifier
from gpt_classifier.freeze import apply_freeze, count_parameters

REPO = Path(__file__).resolve().parents[1]


def run_train(tmp_path: Path, sms_file: Path, *overrides: str, multirun: bool = False):
    """``python train.py`` with gpt2-tiny on the real SMS data, outputs under ``tmp_path``."""
    args = [sys.executable, "train.py"]
    if multirun:
        args += ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        args += [f"hydra.run.dir={tmp_path / 'run'}"]
    args += [
        "model=gpt2-tiny",
        "accelerator=cpu",
        f"data.path={sms_file}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=2",
        "callbacks.progress_bar.refresh_rate=0",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_short_run_writes_every_artefact(tmp_path, sms_file):
    ok(run_train(tmp_path, sms_file, "logger=many"))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert 0.0 <= metrics[f"{split}/acc"] <= 1.0
        assert metrics[f"{split}/loss"] > 0
    for key in ("val/precision", "val/recall", "val/f1", "test/f1", "time/fit_s", "time/test_s"):
        assert key in metrics
    assert 0 < metrics["time/prefix_s"] < metrics["time/fit_s"] + metrics["time/test_s"]
    assert metrics["params/trainable"] < metrics["params/total"]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]).is_file()
    assert sorted(p.name for p in (run / "splits").iterdir()) == [
        "test.csv", "train.csv", "validation.csv"
    ]  # fmt: skip
    assert (run / "csv" / "metrics.csv").is_file()
    tags: set[str] = set()
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert tag in tags, sorted(tags)
    plugin_dir = run / "tensorboard"
    assert any(b"hparams" in p.read_bytes() for p in plugin_dir.glob("events.out.tfevents.*"))


def test_tensorboard_logging_does_not_import_tensorflow(tmp_path):
    # The dev extra installs TensorFlow (it writes the test checkpoints); a run must
    # still write its event files through TensorBoard's stub, without importing it.
    script = (
        "import sys\n"
        "from gpt_classifier.tensorboard_writer import skip_tensorflow_import\n"
        "skip_tensorflow_import()\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        f"with SummaryWriter({str(tmp_path)!r}) as w:\n"
        "    w.add_scalar('a/b', 0.5, 3)\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    ok(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True))
    (events,) = tmp_path.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("a/b")] == [(3, 0.5)]


def test_two_job_multirun_writes_its_summary(tmp_path, sms_file):
    ok(run_train(tmp_path, sms_file, "freeze=last_block,last_layer", multirun=True))
    sweep = tmp_path / "sweep"
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["freeze=last_block", "freeze=last_layer"]
    assert all(0 <= float(r["val/acc"]) <= 1 for r in rows)
    table = (sweep / "summary.md").read_text()
    assert "freeze=last_layer" in table and "val/acc" in table


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("freeze=last_blok", "Could not find 'freeze/last_blok'"),
        ("model=gpt2-huge", "Could not find 'model/gpt2-huge'"),
        ("data.batchsize=4", "Key 'batchsize' is not in struct"),
    ],
)
def test_config_typos_fail_fast(tmp_path, sms_file, override, message):
    result = run_train(tmp_path, sms_file, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run" / "splits").exists()  # failed before any work


def test_unknown_option_lists_the_choices(tmp_path, sms_file):
    result = run_train(tmp_path, sms_file, "accelerator=tpu")
    assert result.returncode != 0
    assert "Available options" in result.stderr and "cpu" in result.stderr


def test_seeded_runs_agree(tmp_path, sms_file):
    ok(run_train(tmp_path / "a", sms_file, "trainer.max_epochs=1"))
    ok(run_train(tmp_path / "b", sms_file, "trainer.max_epochs=1"))
    first = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())
    second = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())
    for key in ("train/acc", "val/acc", "test/acc", "train/loss", "test/loss"):
        assert first[key] == second[key], key


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize(
    ("policy", "n", "trainable"),
    [
        ("last_block", 1, 7_090_946),
        ("last_layer", 1, 1_538),
        ("all", 1, 124_441_346),
        ("last_n_blocks", 2, 7_090_946 + 7_087_872),
    ],
)
def test_freeze_policies_on_gpt2_small(policy, n, trainable):
    model = GPTClassifier(GPT.from_preset("gpt2-small").cfg.to_dict(), freeze=policy, freeze_n=n)
    apply_freeze(model.model, policy, n)
    assert count_parameters(model.model) == (trainable, 124_441_346)
    trainable_names = {name for name, p in model.model.named_parameters() if p.requires_grad}
    if policy == "last_block":
        assert trainable_names == {
            *(f"trf_blocks.11.{k}" for k, _ in model.model.trf_blocks[11].named_parameters()),
            "final_norm.weight", "final_norm.bias", "out_head.weight", "out_head.bias",
        }  # fmt: skip
    if policy == "last_layer":
        assert trainable_names == {"out_head.weight", "out_head.bias"}


def test_freeze_rejects_bad_options():
    model = GPT.from_preset("gpt2-tiny")
    with pytest.raises(ValueError, match="freeze.n=3 must be between 1 and the model's 2 blocks"):
        apply_freeze(model, "last_n_blocks", 3)
    with pytest.raises(ValueError, match="freeze.policy='some'"):
        apply_freeze(model, "some")


def _batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    examples = [{"input_ids": torch.tensor(s), "label": 0} for s in seqs]
    return Collator()(examples)


@pytest.mark.parametrize("policy", ["last_block", "last_layer", "all", "last_n_blocks"])
def test_prediction_does_not_depend_on_batch_padding(policy):
    torch.manual_seed(0)
    clf = GPTClassifier(GPT.from_preset("gpt2-tiny").cfg.to_dict(), freeze=policy, freeze_n=2)
    clf.eval()
    message = torch.randint(0, 50000, (12,)).tolist()
    long_ones = [torch.randint(0, 50000, (200,)).tolist() for _ in range(3)]
    with torch.no_grad():
        alone = torch.softmax(clf(_batch([message])), -1)[0]
        among_long = torch.softmax(clf(_batch([*long_ones, message])), -1)[-1]
    torch.testing.assert_close(among_long, alone, atol=1e-6, rtol=1e-6)
    assert among_long.argmax() == alone.argmax()


def test_book_pooling_depends_on_padding_and_ours_equals_full_forward():
    torch.manual_seed(0)
    clf = GPTClassifier(GPT.from_preset("gpt2-tiny").cfg.to_dict(), pooling="final_position")
    ours = GPTClassifier(GPT.from_preset("gpt2-tiny").cfg.to_dict())
    ours.load_state_dict(clf.state_dict())
    clf.eval(), ours.eval()
    message = torch.randint(0, 50000, (12,)).tolist()
    batch = _batch([message, [1] * 40])
    with torch.no_grad():
        full = ours.model(batch["input_ids"])  # the book's model(input_ids)[:, -1, :]
        torch.testing.assert_close(clf(batch)[0], full[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(batch)[0], full[0, 11], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(full[0, -1], full[0, 11])

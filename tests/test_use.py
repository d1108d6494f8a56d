"""Use a trained model: predict, evaluate and export through the real entry points."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_classifier.inference import ModelLoadError, TextClassifier

REPO = Path(__file__).resolve().parents[1]
SPAM = "WINNER!! As a valued network customer you have been selected to receive a £900 prize"
HAM = "Ok lar... Joking wif u oni..."


def app(script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, script, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sms_file) -> Path:
    """A briefly trained gpt2-tiny run."""
    out = tmp_path_factory.mktemp("trained") / "run"
    ok(app("train.py", "model=gpt2-tiny", "accelerator=cpu", f"data.path={sms_file}",
           "trainer.max_epochs=2", f"hydra.run.dir={out}",
           "callbacks.progress_bar.refresh_rate=0"))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    ok(app("export.py", f"ckpt_path={run_dir}", f"out={out}",
           f"hydra.run.dir={out.parent / 'hydra'}"))  # fmt: skip
    return out


def test_training_writes_curves(run_dir):
    for name in ("loss-plot.png", "accuracy-plot.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_export_is_self_contained_and_reproduces_the_checkpoint(run_dir, export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "README.md", "config.json", "model.safetensors"
    ]  # fmt: skip
    config = json.loads((export_dir / "config.json").read_text())
    assert config["label_names"] == ["ham", "spam"]
    assert config["pooling"] == "last_token" and config["truncation_side"] == "right"
    texts = [SPAM, HAM, "see you at 5", "URGENT! call 09061701461 to claim your reward"]
    from_ckpt = TextClassifier.load(run_dir).probabilities(texts)
    from_export = TextClassifier.load(export_dir).probabilities(texts)
    torch.testing.assert_close(from_export, from_ckpt, atol=1e-6, rtol=0)


def test_prediction_is_the_same_alone_batched_and_through_each_entry_point(
    run_dir, export_dir, tmp_path
):
    clf = TextClassifier.load(run_dir)
    alone = clf.classify([HAM])[0]
    long_texts = [SPAM * 6, "lorem ipsum " * 150, HAM * 20]
    batched = clf.classify([*long_texts, HAM], batch_size=4)[-1]
    assert batched.label == alone.label
    for name, value in alone.probabilities.items():
        assert batched.probabilities[name] == pytest.approx(value, abs=1e-6)

    result = ok(app("predict.py", f"ckpt_path={run_dir}", f"text={HAM}",
                    f"hydra.run.dir={tmp_path / 'p1'}"))  # fmt: skip
    assert result.stdout.startswith(f"{alone.label}\t(")
    predictions = list(csv.DictReader((tmp_path / "p1" / "predictions.csv").open()))
    assert predictions[0]["label"] == alone.label
    assert float(predictions[0]["p_spam"]) == pytest.approx(alone.probabilities["spam"], abs=1e-6)

    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join([*long_texts, HAM]) + "\n")
    ok(app("predict.py", f"ckpt_path={export_dir}", f"input={inputs}",
           f"output={tmp_path / 'out.jsonl'}", f"hydra.run.dir={tmp_path / 'p2'}"))  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[-1]["text"] == HAM
    assert records[-1]["label"] == alone.label
    assert records[-1]["probabilities"]["spam"] == pytest.approx(
        alone.probabilities["spam"], abs=1e-6
    )
    assert records[1]["truncated"] is True  # longer than gpt2-tiny's 256-token context


def test_eval_writes_metrics_confusion_matrix_and_report(run_dir, tmp_path):
    ok(app("eval.py", f"ckpt_path={run_dir}", f"hydra.run.dir={tmp_path / 'e'}"))
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["examples"] == 300
    assert metrics["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert metrics["spam/f1"] == pytest.approx(trained["test/f1"], abs=1e-6)
    assert (tmp_path / "e" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "precision" in (tmp_path / "e" / "classification_report.txt").read_text()
    assert list((tmp_path / "e" / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_on_a_labelled_file(run_dir, export_dir, tmp_path):
    labelled = run_dir / "splits" / "validation.csv"
    ok(app("eval.py", f"ckpt_path={export_dir}", f"labelled_file={labelled}",
           f"hydra.run.dir={tmp_path / 'e'}"))  # fmt: skip
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["examples"] == 149
    assert metrics["acc"] == pytest.approx(trained["val/acc"], abs=1e-6)


# ----------------------------------------------------------------------------- errors


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint .*nope.ckpt does not exist"):
        TextClassifier.load(tmp_path / "nope.ckpt")
    result = app("predict.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", "text=hi",
                 f"hydra.run.dir={tmp_path / 'p'}")  # fmt: skip
    assert result.returncode != 0 and "nope.ckpt does not exist" in result.stderr


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="bad.ckpt is not a readable checkpoint"):
        TextClassifier.load(bad)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone_config": Evil()}}, path)
    with pytest.raises(ModelLoadError, match="evil.ckpt is not a readable checkpoint"):
        TextClassifier.load(path)


def test_incompatible_checkpoint_is_named(run_dir, tmp_path):
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["backbone_config"]["emb_dim"] = 128
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match="other.ckpt does not fit its own config"):
        TextClassifier.load(path)


def test_not_our_checkpoint_is_named(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelLoadError, match="not a gpt-classifier checkpoint"):
        TextClassifier.load(path)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_export_folder_with_a_missing_file_is_named(export_dir, tmp_path, missing):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in export_dir.iterdir():
        if f.name != missing:
            (broken / f.name).write_bytes(f.read_bytes())
    expected = f"lacks {missing}" if missing == "model.safetensors" else "neither an export"
    with pytest.raises(ModelLoadError, match=expected):
        TextClassifier.load(broken)


def test_empty_line_in_input_is_named(run_dir, tmp_path):
    inputs = tmp_path / "texts.txt"
    inputs.write_text(f"{HAM}\n\n{SPAM}\n")
    result = app("predict.py", f"ckpt_path={run_dir}", f"input={inputs}",
                 f"hydra.run.dir={tmp_path / 'p'}")  # fmt: skip
    assert result.returncode != 0
    assert "texts.txt, line 2: empty line" in result.stderr


def test_checkpoints_keep_frozen_weights_once(run_dir, tmp_path):
    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])
    stored = torch.load(best, weights_only=True)
    assert "model.tok_emb.weight" not in stored["state_dict"]  # frozen: in the shared file
    assert "model.out_head.weight" in stored["state_dict"]
    frozen = run_dir / "checkpoints" / "frozen.safetensors"
    assert frozen.is_file()
    want = TextClassifier.load(best).probabilities([HAM])
    # A checkpoint copied elsewhere with its frozen file beside it still loads.
    moved = tmp_path / "moved"
    moved.mkdir()
    stored["frozen_weights"] = str(tmp_path / "gone" / "frozen.safetensors")
    torch.save(stored, moved / "best.ckpt")
    with pytest.raises(ModelLoadError, match="frozen.safetensors is missing"):
        TextClassifier.load(moved / "best.ckpt")
    (moved / "frozen.safetensors").write_bytes(frozen.read_bytes())
    got = TextClassifier.load(moved / "best.ckpt").probabilities([HAM])
    torch.testing.assert_close(got, want, atol=0, rtol=0)

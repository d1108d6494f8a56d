"""Use a trained model: predict, evaluate and export through the real entry points."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from entry_points import ok, run_entry, run_train

from gpt_classifier import GPT, GPTConfig, SequenceClassifier
from gpt_classifier.data.batching import Collator
from gpt_classifier.inference import ModelLoadError, TextClassifier
from gpt_classifier.model.weight_names import WeightLoadError

REPO = Path(__file__).resolve().parents[1]
SPAM = "WINNER!! As a valued network customer you have been selected to receive a £900 prize"
HAM = "Ok lar... Joking wif u oni..."


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    ok(run_entry("export.py", f"ckpt_path={run_dir}", f"out={out}",
           f"hydra.run.dir={out.parent / 'hydra'}"))  # fmt: skip
    return out


def test_training_writes_curves(run_dir):
    for name in ("loss-plot.png", "accuracy-plot.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    # The curves' history is part of last.ckpt, so a resumed run plots every epoch.
    stored = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (history,) = [v for k, v in stored["callbacks"].items() if "TrainingCurves" in k]
    assert sorted(history["history"]) == [1, 2]
    assert history["examples_seen"] == 2 * (1045 // 8) * 8


def test_an_export_replaces_an_earlier_one_whole_and_keeps_other_files(run_dir, tmp_path):
    """Exporting over an earlier export leaves no file of it (an ONNX graph left beside a
    native export was loaded instead of it); a folder with anything else is refused as is."""
    clf, folder = TextClassifier.load(run_dir), tmp_path / "model"
    expected = clf.probabilities([SPAM, HAM])
    for fmt, first in (("onnx", "model.onnx"), ("native", "model.safetensors"),
                       ("hf", "vocab.json"), ("onnx", "model.onnx")):  # fmt: skip
        assert clf.export(folder, format=fmt) == folder and (folder / first).is_file()
        names = {p.name for p in folder.iterdir()}
        assert ("model.onnx" in names, "vocab.json" in names) == (fmt == "onnx", fmt == "hf")
        assert {p.name for p in tmp_path.iterdir()} == {"model"}  # no temporary folder left
        loaded = TextClassifier.load(folder).probabilities([SPAM, HAM])
        torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)
    (folder / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "bert"}')
    for taken in (folder, mine):
        before = {p.name: p.read_bytes() for p in taken.iterdir() if p.is_file()}
        with pytest.raises(FileExistsError, match="not an export of this project .*"
                           "(notes.txt|config.json).* give a new or empty folder"):  # fmt: skip
            clf.export(taken, format="native")
        assert {p.name: p.read_bytes() for p in taken.iterdir() if p.is_file()} == before
    refused = run_entry("export.py", f"ckpt_path={run_dir}", f"out={mine}",
                        f"hydra.run.dir={tmp_path / 'hydra'}")  # fmt: skip
    assert refused.returncode != 0 and f"out={mine} holds files" in refused.stderr


def test_an_upload_that_cannot_happen_is_named_before_the_export(run_dir, tmp_path, monkeypatch):
    """export.py hub_repo=...: offline, without a token, or not owner/name, it said so only
    after writing the export, in huggingface_hub's words."""
    from huggingface_hub import constants
    from omegaconf import OmegaConf

    from gpt_classifier.tasks.errors import ConfigError
    from gpt_classifier.tasks.export import export

    out = tmp_path / "model"
    cfg = OmegaConf.create({"ckpt_path": str(run_dir), "out": str(out), "hub_repo": "me/spam",
                            "paths": {"output_dir": str(tmp_path)}})  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="hub_repo=me/spam: HF_HUB_OFFLINE=1 forbids"):
        export(cfg)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match="an upload needs a Hugging Face token: run `hf auth"):
        export(cfg)
    cfg.hub_repo = "spam classifier"
    with pytest.raises(ConfigError, match="hub_repo=spam classifier: .* Give owner/name"):
        export(cfg)
    assert not out.exists()


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

    result = ok(run_entry("predict.py", f"ckpt_path={run_dir}", f"text={HAM}",
                    f"hydra.run.dir={tmp_path / 'p1'}"))  # fmt: skip
    assert result.stdout.startswith(f"{alone.label}\t(")
    predictions = list(csv.DictReader((tmp_path / "p1" / "predictions.csv").open()))
    assert predictions[0]["label"] == alone.label
    assert float(predictions[0]["p_spam"]) == pytest.approx(alone.probabilities["spam"], abs=1e-6)

    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join([*long_texts, HAM]) + "\n")
    ok(run_entry("predict.py", f"ckpt_path={export_dir}", f"input={inputs}",
           f"output={tmp_path / 'out.jsonl'}", f"hydra.run.dir={tmp_path / 'p2'}"))  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[-1]["text"] == HAM
    assert records[-1]["label"] == alone.label
    assert records[-1]["probabilities"]["spam"] == pytest.approx(
        alone.probabilities["spam"], abs=1e-6
    )
    assert records[1]["truncated"] is True  # longer than gpt2-tiny's 256-token context


def test_eval_writes_metrics_confusion_matrix_and_report(run_dir, tmp_path):
    """The run was trained on data.path=SMSSpamCollection in another folder: it keeps the
    file's absolute path, so that eval.py re-makes its split from here."""
    from omegaconf import OmegaConf

    given = run_dir.parent / "data" / "SMSSpamCollection"
    assert OmegaConf.load(run_dir / "run_config.yaml").config.data.path == str(given)
    ok(run_entry("eval.py", f"ckpt_path={run_dir}", f"hydra.run.dir={tmp_path / 'e'}"))
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["examples"] == 300
    assert metrics["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert metrics["class/spam/f1"] == pytest.approx(trained["test/f1"], abs=1e-6)
    assert (tmp_path / "e" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "precision" in (tmp_path / "e" / "classification_report.txt").read_text()
    assert list((tmp_path / "e" / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_and_predict_take_data_path_like_train(run_dir, sms_file, tmp_path):
    """The data.path=... a run was trained with works for eval.py and predict.py too."""
    from omegaconf import OmegaConf

    from gpt_classifier.tasks.evaluate import evaluate
    from gpt_classifier.tasks.predict import predict

    moved = tmp_path / "moved" / "SMSSpamCollection"
    moved.parent.mkdir()
    shutil.copy(sms_file, moved)
    cfg = OmegaConf.load(REPO / "configs" / "eval.yaml")
    cfg.merge_with({"ckpt_path": str(run_dir), "data": {"path": str(moved)},
                    "paths": {"output_dir": str(tmp_path / "e")}, "device": "cpu"})  # fmt: skip
    del cfg["defaults"]
    metrics = evaluate(cfg)
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    cfg.data.path = str(tmp_path / "gone.tsv")
    said = r"gone.tsv does not exist; give eval.py data.path=<where the file is now> or "
    with pytest.raises(FileNotFoundError, match=said + r"labelled_file=.*splits/test.csv \(the"):
        evaluate(cfg)

    few = tmp_path / "few.tsv"
    few.write_text(f"ham\t{HAM}\nspam\t{SPAM}\nunsure\t{HAM}\n")  # any label is kept
    cfg = OmegaConf.load(REPO / "configs" / "predict.yaml")
    del cfg["defaults"]
    cfg.merge_with({"ckpt_path": str(run_dir), "data": {"path": str(few)}, "device": "cpu",
                    "output": str(tmp_path / "p" / "predictions.csv")})  # fmt: skip
    predict(cfg)
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open(encoding="utf-8")))
    assert [(r["text"], r["file_label"]) for r in rows] == [(HAM, "ham"), (SPAM, "spam"),
                                                            (HAM, "unsure")]  # fmt: skip


def test_data_path_keeps_its_old_name_and_inputs_are_exclusive(tmp_path):
    from omegaconf import OmegaConf

    from gpt_classifier.tasks.evaluate import data_path
    from gpt_classifier.tasks.predict import predict

    assert data_path(OmegaConf.create({"data": {"path": "a"}, "data_path": None})) == "a"
    assert data_path(OmegaConf.create({"data": {"path": None}, "data_path": "b"})) == "b"
    with pytest.raises(ValueError, match="data.path=a and data_path=b disagree"):
        data_path(OmegaConf.create({"data": {"path": "a"}, "data_path": "b"}))
    both = OmegaConf.create({"text": "hi", "input": None, "data": {"path": "x.tsv"}})
    with pytest.raises(ValueError, match="got text and data.path"):
        predict(both)
    json_out = OmegaConf.create({"text": "hi", "input": None, "output": "p.json"})
    with pytest.raises(ValueError, match=r"output=p.json: end it in .csv or .jsonl"):
        predict(json_out)  # not CSV under a .json name
    texts = tmp_path / "t.csv"
    texts.write_text("text\nhi\n")
    over = OmegaConf.create({"text": None, "input": str(texts), "output": f"{tmp_path}/./t.csv"})
    with pytest.raises(ValueError, match=r"output=.*t.csv is the input file"):
        predict(over)
    assert texts.read_text() == "text\nhi\n"


def test_eval_on_a_labelled_file(run_dir, export_dir, tmp_path):
    labelled = run_dir / "splits" / "validation.csv"
    ok(run_entry("eval.py", f"ckpt_path={export_dir}", f"labelled_file={labelled}",
           f"hydra.run.dir={tmp_path / 'e'}"))  # fmt: skip
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["examples"] == 149
    assert metrics["acc"] == pytest.approx(trained["val/acc"], abs=1e-6)


def test_transformers_export_loads_and_predicts_like_ours(run_dir, tmp_path):
    """export.py format=hf: transformers' own classes and pipeline, no code of ours,
    give our probabilities, alone and batched with padding."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from gpt_classifier.tasks.export import export

    out = tmp_path / "hf"
    export(OmegaConf.create({"ckpt_path": str(run_dir), "out": str(out), "format": "hf"}))
    with (run_dir / "splits" / "test.csv").open(encoding="utf-8", newline="") as f:
        texts = [row["Text"] for row in csv.DictReader(f)][:64] + [SPAM * 40]  # one truncated
    ours = TextClassifier.load(run_dir).probabilities(texts)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "ham", 1: "spam"} and model.config.pad_token_id == 50256
    assert tokenizer(HAM)["input_ids"] == TextClassifier.load(run_dir).encode([HAM])[0][0]
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None,
                        truncation=True, device="cpu")  # fmt: skip
    for batch_size in (1, 8):
        results = classify(texts, batch_size=batch_size)
        theirs = torch.tensor([[next(r["score"] for r in rs if r["label"] == name)
                                for name in ("ham", "spam")] for rs in results])  # fmt: skip
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # And back: our loader reads the transformers folder too.
    again = TextClassifier.load(out).probabilities(texts)
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=0)
    # The model card: what the model says, what it was made from and how, how well it did.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert "**Labels**: `ham`, `spam`" in card.text
    assert "random initialisation, `model=gpt2-tiny`" in card.text  # the base weights
    assert "**Fine-tuning**: `freeze=last_block`" in card.text
    assert "`SMSSpamCollection` (477,907 bytes)" in card.text
    assert "train 1,045, validation 149, test 300" in card.text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"| acc | {metrics['test/acc']:.4f} |" in card.text
    assert "python train.py model=gpt2-tiny accelerator=cpu" in card.text


def test_a_transformers_classifier_starts_training_with_its_head(tmp_path):
    """model.weights=<a GPT2ForSequenceClassification folder>: its score layer becomes our
    head, checked against transformers' own forward on a checkpoint it wrote."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, num_labels=3,
                        pad_token_id=50256)  # fmt: skip
    reference = GPT2ForSequenceClassification(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    ids = torch.tensor([[464, 3290, 318, 257], [40, 588, 50256, 50256]])
    lengths = torch.tensor([4, 2])
    with torch.no_grad():
        expected = reference(ids, attention_mask=(ids != 50256).long()).logits
        ours = SequenceClassifier(GPT.from_pretrained(str(tmp_path / "hf")), 3)(ids, lengths)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"a classifier with 3 classes .*num_classes=2: set "
                       r"classifier.num_classes=3"):  # fmt: skip
        SequenceClassifier(GPT.from_pretrained(str(tmp_path / "hf")), 2)
    # Given where a trained model is expected, the folder's error says what reads it.
    with pytest.raises(ModelLoadError, match=r"hf/config.json: a 🤗 transformers gpt2 model, "
                       r"which predict, .*; use it with transformers' pipeline, or fine-tune "
                       r"from its weights: python train.py model.weights=.*hf$"):  # fmt: skip
        TextClassifier.load(tmp_path / "hf")


def test_a_native_export_as_starting_weights_says_which_export_can(run_dir, tmp_path):
    exported = TextClassifier.load(run_dir).export(tmp_path / "native")
    with pytest.raises(WeightLoadError, match="exported by export.py .format=native.*format=hf"):
        GPT.from_pretrained(exported)


def test_transformers_export_refuses_what_it_would_compute_differently(run_dir, tmp_path):
    from gpt_classifier.inference.hf_format import TransformersExportError

    clf = TextClassifier.load(run_dir)
    clf.settings.pooling = "final_position"
    message = "pooling=final_position: GPT2ForSequenceClassification reads the last non-padding"
    with pytest.raises(TransformersExportError, match=message):
        clf.export(tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- errors


def test_a_sweep_folder_names_its_runs(tmp_path):
    for job in ("0", "1", "10", "2"):
        (tmp_path / job / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelLoadError) as err:
        TextClassifier.load(tmp_path)
    said = f"It holds runs (0, 1, 2, 10): pass one, e.g. the latest: ckpt_path={tmp_path / '10'}"
    assert said in str(err.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint .*nope.ckpt does not exist"):
        TextClassifier.load(tmp_path / "nope.ckpt")
    result = run_entry("predict.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", "text=hi",
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
    result = run_entry("predict.py", f"ckpt_path={run_dir}", f"input={inputs}",
                 f"hydra.run.dir={tmp_path / 'p'}")  # fmt: skip
    assert result.returncode != 0
    assert "texts.txt, line 2: empty line" in result.stderr


def test_checkpoints_keep_frozen_weights_once(run_dir, tmp_path):
    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])
    stored = torch.load(best, weights_only=True)
    assert "model.backbone.tok_emb.weight" not in stored["state_dict"]  # in the shared file
    assert "model.backbone.out_head.weight" in stored["state_dict"]
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


# ----------------------------------------------------------------------------- LoRA runs


@pytest.fixture(scope="module")
def lora_run_dir(tmp_path_factory, sms_file) -> Path:
    """A briefly trained gpt2-tiny run with adapters on every linear layer and the head."""
    out = tmp_path_factory.mktemp("lora") / "run"
    ok(run_entry("train.py", "model=gpt2-tiny", "accelerator=cpu", "trainer.precision=32-true",
           f"data.path={sms_file}", "freeze=lora", "freeze.head=both", "freeze.alpha=32",
           "optimizer.lr=1e-3", "trainer.max_epochs=1", f"hydra.run.dir={out}",
           "callbacks.progress_bar.refresh_rate=0"))  # fmt: skip
    return out


def test_lora_checkpoint_keeps_only_what_trains(lora_run_dir):
    metrics = json.loads((lora_run_dir / "metrics.json").read_text())
    stored = torch.load(metrics["best_checkpoint"], weights_only=True)
    names = set(stored["state_dict"])
    assert names and all("lora_" in n or n.startswith("model.backbone.out_head.") for n in names)
    assert {"model.backbone.out_head.weight", "model.backbone.out_head.lora_B.weight"} <= names
    assert stored["hyper_parameters"]["finetuning"]["method"] == "lora"
    assert metrics["params/trainable"] == sum(t.numel() for t in stored["state_dict"].values())


def test_lora_run_predicts_evaluates_and_exports_merged(lora_run_dir, tmp_path):
    trained = json.loads((lora_run_dir / "metrics.json").read_text())
    ok(run_entry("eval.py", f"ckpt_path={lora_run_dir}", f"hydra.run.dir={tmp_path / 'e'}"))
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert evaluated["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)

    result = ok(run_entry("predict.py", f"ckpt_path={lora_run_dir}", f"text={HAM}",
                    f"hydra.run.dir={tmp_path / 'p'}"))  # fmt: skip
    clf = TextClassifier.load(lora_run_dir)
    assert result.stdout.startswith(f"{clf.classify([HAM])[0].label}\t(")

    out = tmp_path / "export"
    ok(run_entry("export.py", f"ckpt_path={lora_run_dir}", f"out={out}",
           f"hydra.run.dir={tmp_path / 'x'}"))  # fmt: skip
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert not any("lora" in name for name in state)
    config = json.loads((out / "config.json").read_text())
    assert config["merged_adapters"] == 2 * 6 + 1
    # The export loads into the plain model, with no LoRA code at all.
    plain = SequenceClassifier(GPT(GPTConfig.from_dict(config["architecture"])), 2).eval()
    plain.load_state_dict(state, strict=True)
    texts = [SPAM, HAM, "see you at 5", "URGENT! call 09061701461 to claim your reward"]
    want = clf.probabilities(texts)
    # Training moved the adapters, so the merged weights differ from the frozen base.
    base = load_file(str(lora_run_dir / "checkpoints" / "frozen.safetensors"))
    name = "backbone.trf_blocks.0.att.W_query.weight"
    assert not torch.allclose(state[name], base[f"model.{name}"])
    torch.testing.assert_close(
        TextClassifier.load(out).probabilities(texts), want, atol=1e-5, rtol=0
    )
    ids, _ = clf.encode(texts)
    batch = Collator()([{"input_ids": torch.tensor(i), "label": 0} for i in ids])
    with torch.no_grad():
        plain_probs = torch.softmax(plain(batch["input_ids"], batch["lengths"]), dim=-1)
    torch.testing.assert_close(plain_probs, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- moved runs


def test_a_moved_run_folder_predicts_and_evaluates_with_its_own_files(run_dir, tmp_path):
    want = TextClassifier.load(run_dir).probabilities([HAM, SPAM])
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    assert torch.equal(TextClassifier.load(moved).probabilities([HAM, SPAM]), want)
    ok(run_entry("eval.py", f"ckpt_path={moved}", f"hydra.run.dir={tmp_path / 'e'}"))
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)  # the best, not last
    # The copy's own frozen weights are read, not the ones where training wrote them.
    frozen = moved / "checkpoints" / "frozen.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(str(frozen))
    weights["model.backbone.pos_emb.weight"] = torch.zeros_like(
        weights["model.backbone.pos_emb.weight"]
    )
    save_file(weights, str(frozen))
    assert not torch.allclose(TextClassifier.load(moved).probabilities([HAM, SPAM]), want)


def test_a_moved_run_resumes_with_its_own_frozen_weights(run_dir, tmp_path, sms_file):
    import lightning as L

    from gpt_classifier.data.datamodule import SMSSpamDataModule
    from gpt_classifier.finetuning import TrainLastBlocks
    from gpt_classifier.training.frozen_weights import FrozenWeightsFile
    from gpt_classifier.training.module import ClassifierModule

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    last = moved / "checkpoints" / "last.ckpt"
    stored = torch.load(last, weights_only=True)
    # A model whose frozen weights differ from the run's: resuming must replace them.
    torch.manual_seed(99)
    module = ClassifierModule(
        SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2), TrainLastBlocks(1)
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=stored["epoch"] + 2, limit_train_batches=2,
        limit_val_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[FrozenWeightsFile()],
        default_root_dir=str(tmp_path / "resumed"),
    )  # fmt: skip
    dm = SMSSpamDataModule(path=str(sms_file), context_length=256)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last))
    assert trainer.global_step == stored["global_step"] + 2
    from safetensors.torch import load_file

    frozen = load_file(str(moved / "checkpoints" / "frozen.safetensors"))
    state = module.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(state[name], tensor), name


# ----------------------------------------------------------------------------- old formats


def test_exports_and_checkpoints_of_format_1_still_load(run_dir, export_dir, tmp_path):
    """Written before SequenceClassifier: no "backbone." prefix, fused query/key/value."""
    from safetensors.torch import load_file, save_file

    def to_format_1(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        old: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            name = name.replace(f"{prefix}backbone.", prefix)
            if ".att.W_query." in name:
                parts = [state[name.replace(prefix, f"{prefix}backbone.", 1).replace(
                    "W_query", p)] for p in ("W_query", "W_key", "W_value")]  # fmt: skip
                old[name.replace("W_query", "qkv")] = torch.cat(parts)
            elif ".att.W_key." not in name and ".att.W_value." not in name:
                old[name] = t
        return old

    texts = [SPAM, HAM]
    want = TextClassifier.load(export_dir).probabilities(texts)
    legacy = tmp_path / "legacy"
    shutil.copytree(export_dir, legacy)
    save_file(to_format_1(load_file(str(export_dir / "model.safetensors")), ""),
              str(legacy / "model.safetensors"))  # fmt: skip
    config = json.loads((legacy / "config.json").read_text())
    config["format_version"] = 1
    (legacy / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(TextClassifier.load(legacy).probabilities(texts), want)

    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])
    stored = torch.load(best, weights_only=True)
    frozen = load_file(str(best.parent / "frozen.safetensors"))
    stored["state_dict"] = to_format_1({**frozen, **stored["state_dict"]}, "model.")
    del stored["frozen_weights"], stored["hyper_parameters"]["finetuning"]
    torch.save(stored, tmp_path / "legacy.ckpt")
    torch.testing.assert_close(
        TextClassifier.load(tmp_path / "legacy.ckpt").probabilities(texts), want
    )


def _landed_report(labels: list[int], preds: list[int], n: int) -> dict[str, float]:
    """The hand-written per-class numbers eval.py computed before torchmetrics."""
    matrix = [[0] * n for _ in range(n)]
    for y, p in zip(labels, preds):
        matrix[y][p] += 1
    out: dict[str, float] = {"acc": sum(matrix[i][i] for i in range(n)) / len(labels)}
    f1s = []
    for i in range(n):
        tp, predicted, actual = matrix[i][i], sum(row[i] for row in matrix), sum(matrix[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        out |= {f"class/{i}/precision": precision, f"class/{i}/recall": recall,
                f"class/{i}/f1": f1, f"class/{i}/support": actual}  # fmt: skip
    out["f1_macro"] = sum(f1s) / n
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_eval_report_from_torchmetrics_equals_the_landed_numbers(n):
    from gpt_classifier.tasks.evaluate import classification_report

    generator = torch.Generator().manual_seed(n)
    labels = torch.randint(0, n, (301,), generator=generator).tolist()
    probs = torch.softmax(torch.randn(301, n, generator=generator), dim=1)
    if n == 3:
        probs[:, 2] = 0.0  # a class never predicted: its precision is 0, not NaN
    metrics, matrix = classification_report(labels, probs, [str(i) for i in range(n)])
    landed = _landed_report(labels, probs.argmax(dim=1).tolist(), n)
    for key, value in landed.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert sum(map(sum, matrix)) == 301


@pytest.mark.parametrize("which", ["last_block", "lora"])
def test_onnx_export_runs_in_onnx_runtime_like_ours(which, request, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    run = request.getfixturevalue("run_dir" if which == "last_block" else "lora_run_dir")
    ours = TextClassifier.load(run)
    out = ours.export(tmp_path / "onnx", format="onnx")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.onnx", "model.onnx.data"
    ]  # fmt: skip
    with (run / "splits" / "test.csv").open(encoding="utf-8", newline="") as f:
        texts = [row["Text"] for row in csv.DictReader(f)][:64]
    texts.append("a long message " * 100)  # over gpt2-tiny's context: truncated alike
    onnx = TextClassifier.load(out)
    assert not isinstance(onnx.model, torch.nn.Module)  # ONNX Runtime, not torch
    # Any batch size and length (dynamic axes), LoRA merged: our probabilities to 1e-5.
    for batch_size in (1, 7, 32):
        torch.testing.assert_close(
            onnx.probabilities(texts, batch_size), ours.probabilities(texts), atol=1e-5, rtol=0
        )
    assert [p.label for p in onnx.classify(texts)] == [p.label for p in ours.classify(texts)]
    assert onnx.num_parameters() == ours.num_parameters() - (
        0 if which == "last_block" else sum(p.numel() for n, p in ours.model.named_parameters()
                                            if "lora" in n)
    )  # fmt: skip
    with pytest.raises(ValueError, match="runs on the CPU here"):
        TextClassifier.load(out, device="cuda")
    # On a machine with a GPU, device=auto (predict.py's and serve.py's default) is the CPU
    # for an ONNX export: it was the GPU, which the export refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TextClassifier.load(out).device.type == "cpu"
    from hydra import compose, initialize_config_dir

    from gpt_classifier.inference import server_processes
    from gpt_classifier.tasks.serve import build_server

    class Server:
        def __init__(self, api, accelerator, **settings):
            self.accelerator = accelerator

    monkeypatch.setattr(server_processes, "ClassifierServer", Server)
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt_path={out}"])
    assert build_server(cfg).accelerator == "cpu"


def test_a_sharded_checkpoint_folder_loads_and_exports_as_one_model(run_dir, tmp_path):
    """`trainer=fsdp` writes each checkpoint as a folder (torch.distributed.checkpoint's
    shard files + Lightning's meta.pt); inference and export.py read it as one model.
    Written here by torch.distributed.checkpoint in one process, in the layout
    Lightning's FSDPStrategy.save_checkpoint uses (FSDP itself needs GPUs)."""
    import torch.distributed.checkpoint as dcp

    from gpt_classifier.checkpoints import find_checkpoint

    source = find_checkpoint(run_dir, best=True)
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    folder = tmp_path / "checkpoints" / source.name
    folder.parent.mkdir()
    shutil.copy(source.parent / "frozen.safetensors", folder.parent)
    state = {"model": checkpoint.pop("state_dict")}
    state.update({f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states"))})
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    assert any(folder.glob("*.distcp"))

    texts = [SPAM, HAM, "see you at 5", "URGENT! call 09061701461 to claim your reward"]
    expected = TextClassifier.load(source).probabilities(texts)
    torch.testing.assert_close(TextClassifier.load(folder).probabilities(texts), expected,
                               atol=0, rtol=0)  # fmt: skip
    exported = TextClassifier.load(folder).export(tmp_path / "export")
    assert (exported / "model.safetensors").is_file()
    torch.testing.assert_close(TextClassifier.load(exported).probabilities(texts), expected,
                               atol=1e-6, rtol=0)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_are_read_straight_into_the_parameters(tmp_path, dtype):
    from safetensors.torch import save_file

    from gpt_classifier.checkpoints import load_frozen_weights_in_place

    torch.manual_seed(0)
    model = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2).to(dtype)
    state = {f"model.{k}": v for k, v in model.state_dict(keep_vars=True).items()}
    frozen = {k: v.detach().clone() for k, v in state.items() if "trf_blocks.1" not in k}
    save_file(frozen, str(tmp_path / "frozen.safetensors"))
    with torch.no_grad():
        for tensor in state.values():
            tensor.zero_()
    trained = {k: v for k, v in state.items() if k not in frozen}
    checkpoint = {"frozen_weights": str(tmp_path / "frozen.safetensors"), "state_dict": trained}
    assert load_frozen_weights_in_place(checkpoint, tmp_path / "last.ckpt", state)
    for name, tensor in frozen.items():
        assert torch.equal(state[name], tensor), name
    # A file naming tensors the model lacks is left to the general path.
    save_file({"model.nope": torch.zeros(1)}, str(tmp_path / "frozen.safetensors"))
    assert not load_frozen_weights_in_place(checkpoint, tmp_path / "last.ckpt", state)


def test_predict_reads_texts_from_standard_input_without_hydra_quoting(run_dir, tmp_path):
    out = tmp_path / "predictions.jsonl"
    texts = "Sorry, I'll call later!\nWINNER!! Claim your £900 prize, call 09061701461 🎉\n"
    result = run_entry("predict.py", f"ckpt_path={run_dir}", f"output={out}",
                       f"hydra.run.dir={tmp_path / 'out'}", input=texts)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts.splitlines()


def test_empty_or_whitespace_texts_are_refused_with_their_index(run_dir):
    clf = TextClassifier.load(run_dir)
    for texts, index in ((["fine", "   "], 1), ([""], 0), (["a", "b", "\t\n"], 2)):
        with pytest.raises(ValueError, match=f"text {index} is empty or only whitespace"):
            clf.classify(texts)


def test_one_string_is_one_text_and_a_non_string_is_named(run_dir):
    clf = TextClassifier.load(run_dir)
    text = "Free entry in 2 a wkly comp to win FA Cup final tkts"
    assert clf.classify(text) == clf.classify([text])  # not one text per letter
    assert torch.equal(clf.probabilities(text), clf.probabilities([text]))
    with pytest.raises(TypeError, match="text 1 is NoneType None, not a str"):
        clf.classify(["fine", None])


@pytest.mark.parametrize(("method", "name"), [("last_block", "last_blocks"), ("lora", "lora")])
def test_load_from_checkpoint_gives_a_module_that_tests_as_the_run_did(
    tmp_path, sms_file, method, name
):
    import lightning as L

    from gpt_classifier.data.datamodule import SMSSpamDataModule
    from gpt_classifier.training.module import ClassifierModule

    run = tmp_path / "run"
    ok(run_train(tmp_path, sms_file, f"freeze={method}", "trainer.max_epochs=1",
                 "trainer.precision=32-true"))  # fmt: skip
    module = ClassifierModule.load_from_checkpoint(run)  # the run's best checkpoint
    assert module.label_names == ["ham", "spam"] and module.method.name == name
    data = SMSSpamDataModule(path=str(sms_file), context_length=module.model.cfg.context_length)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    recorded = json.loads((run / "metrics.json").read_text())
    assert tested["test/acc"] == pytest.approx(recorded["test/acc"], abs=1e-6)
    # ... and it trains on: the method's parameters are trainable again.
    module.setup("fit")
    assert any(p.requires_grad for p in module.parameters())


def test_a_lora_run_exports_a_peft_adapter_that_gives_our_probabilities(
    tmp_path, sms_file, run_dir
):
    """export.py format=peft: PeftModel on the format=hf base (written to base/, as the run
    started from random weights) gives the checkpoint's probabilities."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    # Two of the three attention projections and one MLP layer, in the last block only:
    # the fused c_attn adapter has rank 2 x 4 with a zero block for the keys.
    ok(run_train(tmp_path, sms_file, "freeze=lora", "freeze.rank=4", "freeze.alpha=8",
                 "freeze.blocks=1", "freeze.targets=[att.W_query,att.W_value,ff.fc]",
                 "trainer.max_epochs=1", "trainer.precision=32-true",
                 "optimizer.lr=1e-3"))  # fmt: skip
    out = tmp_path / "peft"
    ok(run_entry("export.py", f"ckpt_path={run}", f"out={out}", "format=peft",
                 f"hydra.run.dir={tmp_path / 'export'}"))  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())  # where it lies
    assert config["rank_pattern"] == {"attn.c_attn": 8} and config["layers_to_transform"] == [1]
    base = AutoModelForSequenceClassification.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out).eval()
    ours = TextClassifier.load(run)
    texts = [SPAM, HAM, "see you at 5, bring the keys"]
    with torch.no_grad():
        theirs = torch.cat([
            model(input_ids=torch.tensor(ours.encode([t])[0])).logits.softmax(-1) for t in texts
        ])  # fmt: skip
    torch.testing.assert_close(theirs, ours.probabilities(texts), atol=1e-5, rtol=0)
    # The adapters matter: the base alone answers otherwise.
    with torch.no_grad(), model.disable_adapter():
        bare = model(input_ids=torch.tensor(ours.encode([SPAM])[0])).logits.softmax(-1)
    assert not torch.allclose(bare, theirs[:1], atol=1e-4)
    with pytest.raises(ModelLoadError, match=r"It holds a peft adapter .*PeftModel loads"):
        TextClassifier.load(out)  # where a run or an export is asked for, what reads it
    # A run without LoRA has no adapter to export.
    refused = run_entry("export.py", f"ckpt_path={run_dir}", f"out={tmp_path / 'x'}",
                        "format=peft", f"hydra.run.dir={tmp_path / 'export2'}")  # fmt: skip
    assert refused.returncode != 0 and "format=peft needs a LoRA run" in refused.stderr
    merged = ours.export(tmp_path / "native")  # nor has an export of a LoRA run: merged
    refused = run_entry("export.py", f"ckpt_path={merged}", f"out={tmp_path / 'y'}",
                        "format=peft", f"hydra.run.dir={tmp_path / 'export3'}")  # fmt: skip
    assert refused.returncode != 0 and "an export has them merged" in refused.stderr

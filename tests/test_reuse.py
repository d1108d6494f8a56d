"""A sweep's jobs in one process hand on weights, data, the prefix and the frozen-weights
file (gpt_classifier.sweep_reuse), and each job's results stay those of the job alone."""

from __future__ import annotations

import json
import re

import torch
from entry_points import ok, run_train
from omegaconf import OmegaConf

from gpt_classifier import SequenceClassifier, sweep_reuse
from gpt_classifier.finetuning import TrainLastBlocks
from gpt_classifier.tasks.components import build_backbone
from gpt_classifier.training.module import ClassifierModule


def model_cfg(**changes):
    values = {"name": "gpt2-tiny", "pretrained": False, "weights": None, "drop_rate": 0.0,
              "causal_mask": True, **changes}  # fmt: skip
    return OmegaConf.create(values)


def test_a_job_with_the_same_weights_shares_them_and_training_never_writes_them():
    sweep_reuse.forget()
    torch.manual_seed(3)
    first = build_backbone(model_cfg())
    after_first = torch.random.get_rng_state()
    torch.manual_seed(3)
    second = build_backbone(model_cfg())
    # Same tensors, new parameters and modules; the RNG where building would leave it.
    assert second.tok_emb.weight.data_ptr() == first.tok_emb.weight.data_ptr()
    assert second.tok_emb.weight is not first.tok_emb.weight
    assert torch.equal(torch.random.get_rng_state(), after_first)
    # Training the last block of one leaves the other (and the held copy) untouched.
    before = second.trf_blocks[-1].ff.fc.weight.clone()
    module = ClassifierModule(SequenceClassifier(first, 2), TrainLastBlocks(1))
    module.setup("fit")
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert torch.equal(second.trf_blocks[-1].ff.fc.weight, before)
    torch.manual_seed(4)  # another seed: another random initialisation
    assert not torch.equal(build_backbone(model_cfg()).tok_emb.weight, first.tok_emb.weight)
    sweep_reuse.forget()


def test_sweep_jobs_reuse_what_is_unchanged_and_match_separate_runs(tmp_path, sms_file):
    short = ("trainer.max_epochs=1", "trainer.limit_train_batches=20")
    ok(run_train(tmp_path, sms_file, *short, "seed=5,6", "optimizer.lr=1e-3,2e-3",
                 multirun=True))  # fmt: skip
    sweep = tmp_path / "sweep"
    first, second, third, fourth = ((sweep / str(n) / "train.log").read_text() for n in range(4))
    assert "reused" not in first
    # Job 1 changes only the learning rate: weights, data, prefix and frozen file reused.
    assert "Sweep: backbone reused" in second and "Sweep: data reused" in second
    assert "Prefix cache: reused 1382 of 1382 messages from this process's previous job" in second
    assert "computed" not in second and "a hard link to" in second
    # Job 2 has another seed: other random weights and (data.seed follows it) another
    # split, so weights, data, prefix and frozen file are all new.
    assert "Sweep: backbone reused" not in third and "Sweep: data reused" not in third
    assert re.search(r"computed (\d+) of \1 distinct messages", third)
    assert "written once" in third
    assert "Sweep: backbone reused" in fourth and "computed" not in fourth
    frozen = [(sweep / str(n) / "checkpoints" / "frozen.safetensors").stat() for n in range(4)]
    assert frozen[1].st_ino == frozen[0].st_ino != frozen[2].st_ino == frozen[3].st_ino
    # A reusing job's results are those of the same job run alone, to the last bit.
    ok(run_train(tmp_path / "alone", sms_file, *short, "seed=5", "optimizer.lr=2e-3"))
    alone = json.loads((tmp_path / "alone" / "run" / "metrics.json").read_text())
    in_sweep = json.loads((sweep / "1" / "metrics.json").read_text())
    for key in ("train/acc", "val/acc", "test/acc", "train/loss", "val/loss", "test/loss"):
        assert in_sweep[key] == alone[key], key
    assert in_sweep["time/prefix_s"] == 0.0 < alone["time/prefix_s"]


def test_a_data_file_edited_between_jobs_is_read_again(tmp_path):
    """Every file of data.files keys the data a job hands on, the test file too."""
    from gpt_classifier.data.files import FilesDataModule

    sweep_reuse.forget()
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    test.write_text("text,label\nfirst,a\n")

    def test_texts():
        module = FilesDataModule(files={"train": str(train), "test": str(test)})
        module.setup("fit")
        return [text for text, _ in module.splits.test]

    assert test_texts() == ["first"]
    test.write_text("text,label\nsecond one,b\n")
    assert test_texts() == ["second one"]
    sweep_reuse.forget()


def test_a_job_reusing_own_data_has_its_labels(tmp_path):
    """Own data's labels are read from the file: a job handed the data has them too."""
    from gpt_classifier.data.files import FilesDataModule

    sweep_reuse.forget()
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'xyz'[i % 3]}\n" for i in range(60)))
    first, second = (FilesDataModule(path=str(data)) for _ in range(2))
    first.setup("fit")
    second.setup("fit")
    assert second.datasets is first.datasets  # reused, not read again
    assert second.label_names == first.label_names == ["x", "y", "z"]
    sweep_reuse.forget()

"""A sweep's jobs in one process reuse weights, data and the prefix cache, exactly."""

from __future__ import annotations

import json
import re
import shutil

import torch
from omegaconf import OmegaConf
from test_training import ok, run_train

from gpt_classifier import SequenceClassifier
from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.finetuning import TrainLastBlocks
from gpt_classifier.tasks import reuse
from gpt_classifier.tasks.train import build_backbone
from gpt_classifier.training.module import ClassifierModule
from gpt_classifier.training.precision import PRECISION_RECORD


def model_cfg(**changes):
    values = {"name": "gpt2-tiny", "pretrained": False, "weights": None, "drop_rate": 0.0,
              "causal_mask": True, **changes}  # fmt: skip
    return OmegaConf.create(values)


def test_a_job_with_the_same_weights_shares_them_and_training_never_writes_them():
    reuse.clear()
    torch.manual_seed(3)
    first = build_backbone(model_cfg())
    after_first = torch.random.get_rng_state()
    torch.manual_seed(3)
    second = build_backbone(model_cfg())
    # Same tensors, new parameters and modules; the RNG where building would leave it.
    assert second.tok_emb.weight.data_ptr() == first.tok_emb.weight.data_ptr()
    assert second.tok_emb.weight is not first.tok_emb.weight
    assert second.out_head.weight is second.tok_emb.weight
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
    torch.manual_seed(3)
    third = build_backbone(model_cfg())
    assert torch.equal(third.trf_blocks[-1].ff.fc.weight, before)


def test_what_a_job_changes_rebuilds_the_weights():
    reuse.clear()
    torch.manual_seed(3)
    base = build_backbone(model_cfg())
    torch.manual_seed(4)  # another seed: another random initialisation
    reseeded = build_backbone(model_cfg())
    assert not torch.equal(reseeded.tok_emb.weight, base.tok_emb.weight)
    torch.manual_seed(4)
    no_mask = build_backbone(model_cfg(causal_mask=False))
    assert no_mask.tok_emb.weight.data_ptr() != reseeded.tok_emb.weight.data_ptr()
    assert torch.equal(no_mask.tok_emb.weight, reseeded.tok_emb.weight)  # same seed and preset
    assert not no_mask.cfg.causal_mask


def test_a_job_with_the_same_data_settings_reuses_the_tokens(sms_file, tmp_path):
    first = SMSSpamDataModule(path=str(sms_file), batch_size=8, splits_dir=str(tmp_path / "a"))
    first.setup("fit")
    other_batches = SMSSpamDataModule(path=str(sms_file), batch_size=2, shuffle=False,
                                      splits_dir=str(tmp_path / "b"))  # fmt: skip
    other_batches.setup("fit")
    assert other_batches.datasets is first.datasets
    written = [(tmp_path / d / "train.csv").read_bytes() for d in ("a", "b")]
    assert written[0] == written[1]  # each run folder still gets its split files
    padded = SMSSpamDataModule(path=str(sms_file), padding="longest_train")
    padded.setup("fit")
    assert padded.datasets is not first.datasets and padded.pad_to is not None
    reseeded = SMSSpamDataModule(path=str(sms_file), seed=5)
    reseeded.setup("fit")
    assert reseeded.splits.train != first.splits.train


def job_log(sweep, job: int) -> str:
    return (sweep / str(job) / "train.log").read_text()


def test_sweep_jobs_reuse_what_is_unchanged_and_match_separate_runs(tmp_path, sms_file):
    short = ("trainer.max_epochs=1", "trainer.limit_train_batches=20")
    ok(run_train(tmp_path, sms_file, *short, "seed=5,6", "optimizer.lr=1e-3,2e-3",
                 multirun=True))  # fmt: skip
    sweep = tmp_path / "sweep"
    first, second, third, fourth = (job_log(sweep, n) for n in range(4))
    assert "reused" not in first
    # Job 1 changes only the learning rate: weights, data and every prefix are reused.
    assert "Backbone weights reused" in second and "SMS data reused" in second
    assert "Prefix cache: reused 1382 of 1382 messages from this process's" in second
    assert "computed" not in second
    # Job 2 has another seed: other random weights and (data.seed follows it) another
    # split, so weights, data and prefix are all new.
    assert "Backbone weights reused" not in third and "SMS data reused" not in third
    assert re.search(r"computed (\d+) of \1 distinct messages", third)
    assert "Backbone weights reused" in fourth and "SMS data reused" in fourth
    assert "reused" in fourth and "computed" not in fourth
    # The same frozen tensors: job 1's frozen.safetensors is job 0's file, hard-linked;
    # job 2's weights are others, written anew.
    frozen = [(sweep / str(n) / "checkpoints" / "frozen.safetensors").stat() for n in range(4)]
    assert "a hard link to" in second and "written once" in third
    assert frozen[1].st_ino == frozen[0].st_ino != frozen[2].st_ino == frozen[3].st_ino
    # A reusing job's results are those of the same job run alone, to the last bit.
    # Its own prefix cache, but the sweep's precision=auto measurement (measured anew
    # under load, it could pick the other precision).
    (tmp_path / "alone" / "cache").mkdir(parents=True)
    shutil.copy(tmp_path / "cache" / PRECISION_RECORD, tmp_path / "alone" / "cache")
    ok(run_train(tmp_path / "alone", sms_file, *short, "seed=5", "optimizer.lr=2e-3"))
    alone = json.loads((tmp_path / "alone" / "run" / "metrics.json").read_text())
    in_sweep = json.loads((sweep / "1" / "metrics.json").read_text())
    for key in ("train/acc", "val/acc", "test/acc", "train/loss", "val/loss", "test/loss"):
        assert in_sweep[key] == alone[key], key
    assert in_sweep["time/prefix_s"] == 0.0 < alone["time/prefix_s"]
    assert in_sweep["time/startup_s"] > 0

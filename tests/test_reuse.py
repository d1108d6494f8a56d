"""A sweep's later jobs reuse the frozen prefix from disk, and match the same job alone."""

from __future__ import annotations

import json
import re

from entry_points import ok, run_train


def test_sweep_jobs_reuse_the_prefix_cache_and_match_separate_runs(tmp_path, sms_file):
    short = ("trainer.max_epochs=1", "trainer.limit_train_batches=20")
    ok(run_train(tmp_path, sms_file, *short, "seed=5,6", "optimizer.lr=1e-3,2e-3",
                 multirun=True))  # fmt: skip
    sweep = tmp_path / "sweep"
    first, second, third, fourth = ((sweep / str(n) / "train.log").read_text() for n in range(4))
    assert "reused" not in first
    # Job 1 changes only the learning rate: every prefix comes from job 0's file.
    assert "Prefix cache: reused 1382 of 1382 messages from" in second
    # Job 2 has another seed: other random weights, another split, another prefix.
    assert "reused" not in third
    assert re.search(r"reused (\d+) of \1 messages", fourth)  # job 2's file
    # A reusing job's results are those of the same job run alone, to the last bit.
    ok(run_train(tmp_path / "alone", sms_file, *short, "seed=5", "optimizer.lr=2e-3"))
    alone = json.loads((tmp_path / "alone" / "run" / "metrics.json").read_text())
    in_sweep = json.loads((sweep / "1" / "metrics.json").read_text())
    for key in ("train/acc", "val/acc", "test/acc", "train/loss", "val/loss", "test/loss"):
        assert in_sweep[key] == alone[key], key
    assert in_sweep["time/prefix_s"] == 0.0 < alone["time/prefix_s"]
    assert in_sweep["time/startup_s"] > 0

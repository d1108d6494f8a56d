"""The book's additional-experiments table: row configs, the table script, the baseline, Optuna."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from entry_points import ok, run_entry
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
ROWS = range(1, 20)


def row_config(number: int, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"experiment=book_table/row{number:02d}", *overrides])


# What each row changes from row 1 (experiment=book_ch06), as config values.
CHANGES = {
    2: {"classifier.pooling": "first"},
    3: {"freeze._target_": "gpt_classifier.finetuning.TrainHead"},
    4: {"freeze._target_": "gpt_classifier.finetuning.TrainLastBlocks", "freeze.n": 2},
    5: {"freeze._target_": "gpt_classifier.finetuning.TrainAll"},
    6: {"model.name": "gpt2-medium"},
    7: {"model.name": "gpt2-large"},
    8: {"model.name": "gpt2-xl"},
    9: {"model.name": "gpt2-xl", "freeze._target_": "gpt_classifier.finetuning.TrainAll"},
    10: {"model.pretrained": False, "freeze._target_": "gpt_classifier.finetuning.TrainAll"},
    # The book scales LoRA by alpha alone: its alpha 16 and 8 at rank 16 are ours x 16.
    11: {"freeze._target_": "gpt_classifier.finetuning.LoRA", "freeze.rank": 16,
         "freeze.alpha": 256, "freeze.head": "both"},
    12: {"model.name": "gpt2-xl", "freeze._target_": "gpt_classifier.finetuning.LoRA",
         "freeze.rank": 16, "freeze.alpha": 128, "freeze.head": "both"},
    13: {"data.padding": "context"},
    14: {"data.padding": "batch", "data.batch_size": 1, "data.eval_batch_size": 1},
    15: {"data.padding": "batch", "data.batch_size": 1, "data.eval_batch_size": 1,
         "trainer.accumulate_grad_batches": 8},
    16: {"classifier.pooling": "last_token"},
    17: {"model.causal_mask": False},
    19: {"classifier.pooling": "mean_with_padding"},
}  # fmt: skip


def flat(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("number", ROWS)
def test_each_row_changes_exactly_what_the_book_changed(number):
    base, cfg = row_config(1), row_config(number)
    changes = CHANGES.get(number, {})
    for key, value in changes.items():
        assert flat(cfg, key) == value, key
    # Everything else is row 1's: the book's recipe (book split, padding to the longest
    # training message, final-position logits, gpt2-small, last block, 5 epochs, seed 123).
    assert flat(base, "data.book_compat") is True and flat(base, "data.padding") == "longest_train"
    assert flat(base, "classifier.pooling") == "final_position"
    for key in ("data.book_compat", "data.padding", "data.batch_size", "classifier.pooling",
                "model.name", "model.pretrained", "model.causal_mask", "trainer.max_epochs",
                "trainer.accumulate_grad_batches", "optimizer.lr", "optimizer.weight_decay",
                "seed", "freeze._target_"):  # fmt: skip
        if key not in changes and not any(k.startswith(key + ".") for k in changes):
            assert flat(cfg, key) == flat(base, key), (number, key)


def test_representative_rows_train_a_batch(tmp_path, sms_file):
    rows = "book_table/row11,book_table/row14,book_table/row17,book_table/row19"
    ok(run_entry("train.py", "-m", f"experiment={rows}", "model=gpt2-tiny",
                 f"data.path={sms_file}", "accelerator=cpu", "trainer.fast_dev_run=true",
                 f"hydra.sweep.dir={tmp_path}",
                 "callbacks.progress_bar.refresh_rate=0"))  # fmt: skip
    with (tmp_path / "summary.csv").open(newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["overrides"].split("/")[-1] for r in summary] == ["row11", "row14", "row17", "row19"]
    assert all(0 <= float(r["test/acc"]) <= 1 for r in summary)


def test_table_script_writes_markdown_and_csv_beside_the_books_numbers(tmp_path, sms_file):
    result = ok(run_entry("scripts/book_table.py", "--rows", "1,16", "--out", tmp_path, "--",
                          "model=gpt2-tiny", f"data.path={sms_file}", "accelerator=cpu",
                          "trainer.fast_dev_run=true",
                          "callbacks.progress_bar.refresh_rate=0"))  # fmt: skip
    table = (tmp_path / "book_table.md").read_text()
    assert table in result.stdout
    assert (
        "| 1 | gpt2-small, last token, last_block" in table and "| 96.63 | 99.33 | 95.0 |" in table
    )
    with (tmp_path / "book_table.csv").open(newline="") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["1", "16", "baseline"]
    for number in ("1", "16"):
        metrics = json.loads((tmp_path / "runs" / f"row{number:0>2}" / "metrics.json").read_text())
        assert float(rows[number]["ours test"]) == round(100 * metrics["test/acc"], 2)
        assert int(rows[number]["trainable params"]) == 50_242  # gpt2-tiny, last block
        assert rows[number]["weights"] == "random" and rows[number]["machine"]
    assert rows["16"]["book test"] == "98.33"
    # The baseline trained and tested on the rows' split, the book's.
    for split in ("train", "validation", "test"):
        baseline = (tmp_path / "runs" / "baseline" / "splits" / f"{split}.csv").read_text()
        assert baseline == (tmp_path / "runs" / "row01" / "splits" / f"{split}.csv").read_text()
    assert float(rows["baseline"]["ours test"]) > 95


def test_baseline_writes_its_metrics(tmp_path, sms_file):
    from gpt_classifier.training.metrics import logged_names

    ok(run_entry("baseline.py", f"data.path={sms_file}", "data.book_compat=true",
                 "optimize_metric=val/f1_macro", f"hydra.run.dir={tmp_path}"))  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("train", "val", "test"):  # the names train.py writes, so any optimize_metric
        assert {k for k in metrics if k.startswith(f"{split}/")} == {
            f"{split}/{name}" for name in logged_names(["ham", "spam"])}  # fmt: skip
        for key in ("acc", "loss", "precision", "recall", "f1"):
            assert 0 <= metrics[f"{split}/{key}"] <= (1 if key != "loss" else 10)
    assert metrics["test/acc"] > 0.95 and metrics["val/acc"] > 0.95  # ~0.977 and ~0.993
    assert metrics["time/fit_s"] > 0


def test_optuna_search_runs_its_trials(tmp_path, sms_file):
    ok(run_entry("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                 "freeze.n=choice(1, 2)",  # gpt2-tiny has 2 blocks; the default range is 1 to 3
                 "model=gpt2-tiny", f"data.path={sms_file}", "accelerator=cpu",
                 "trainer.fast_dev_run=true", f"hydra.sweep.dir={tmp_path}",
                 "callbacks.progress_bar.refresh_rate=0"))  # fmt: skip
    jobs = sorted(p.name for p in tmp_path.iterdir() if (p / "metrics.json").is_file())
    assert jobs == ["0", "1"]
    results = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in results and "optimizer.lr" in results
    with (tmp_path / "summary.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 2

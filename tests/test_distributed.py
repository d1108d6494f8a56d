"""Data-parallel training: each process's share of the data, and `trainer=ddp_sim` runs
(two CPU processes over gloo) against one-process runs with the same global batch."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from entry_points import ok, run_entry, run_train
from torch.utils.data import BatchSampler, SequentialSampler

from gpt_classifier.data.samplers import (
    BucketBatchSampler,
    LengthSortedSampler,
    RankBatches,
    ReplayableRandomSampler,
    ResumableLoader,
)


@pytest.mark.parametrize(("n", "batch_size", "world", "drop_last"),
                         [(37, 4, 2, True), (37, 4, 2, False), (37, 3, 4, False),
                          (9, 4, 2, False), (40, 5, 3, True)])  # fmt: skip
def test_rank_batches_split_each_global_batch_of_the_one_process_order(n, batch_size, world,
                                                                       drop_last):  # fmt: skip
    torch.manual_seed(0)
    one_process = list(BatchSampler(ReplayableRandomSampler(range(n)), batch_size * world,
                                    drop_last))  # fmt: skip
    shares = []
    for rank in range(world):
        torch.manual_seed(0)  # every process draws the same order
        batches = BatchSampler(ReplayableRandomSampler(range(n)), batch_size * world, drop_last)
        shares.append(list(RankBatches(batches, rank, world)))
    # Same number of batches everywhere (DDP), none empty, and together each global batch.
    assert {len(s) for s in shares} == {len(one_process)}
    for step, global_batch in enumerate(one_process):
        parts = [share[step] for share in shares]
        assert all(parts)
        if len(global_batch) >= world:
            assert sum(parts, []) == global_batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        else:  # a last batch shorter than the processes: one example each, some repeated
            assert set(sum(parts, [])) == set(global_batch)
    if drop_last:
        assert all(len(p) == batch_size for share in shares for p in share)


def test_rank_batches_keep_the_bucketed_order_and_its_resume_state():
    lengths = [i % 17 + 1 for i in range(100)]
    whole = list(BucketBatchSampler(lengths, 8, True, seed=3))
    sampler = BucketBatchSampler(lengths, 8, True, seed=3)
    shares = [list(RankBatches(BucketBatchSampler(lengths, 8, True, seed=3), r, 2))
              for r in range(2)]  # fmt: skip
    assert [a + b for a, b in zip(*shares)] == whole
    # Lightning's set_epoch and the loader's order state reach the wrapped sampler.
    ranked = RankBatches(sampler, 0, 2)
    ranked.set_epoch(4)
    assert sampler.epoch == 4
    list(ranked)
    assert ranked.order_state() == {"epoch": 4}
    loader = ResumableLoader(range(100), batch_sampler=RankBatches(BatchSampler(
        SequentialSampler(range(100)), 8, True), 1, 2))  # fmt: skip
    assert loader.state_dict()["order"] is None  # a sequential order has nothing to replay
    assert next(iter(loader)).tolist() == [4, 5, 6, 7]


def test_length_sorted_shares_cover_every_example_once():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    shares = [list(LengthSortedSampler(lengths, r, 3)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(len(lengths)))
    assert list(LengthSortedSampler(lengths)) == [1, 3, 5, 0, 4, 6, 2]
    with pytest.raises(ValueError, match="rank 3 is not one of 3"):
        LengthSortedSampler(lengths, 3, 3)


def tree(folder: Path) -> list[str]:
    """A folder's files and folders, sorted; TensorBoard event files all as "events"
    (their names hold the time, host, process id and a per-process count)."""
    names = (str(p.relative_to(folder)) for p in folder.rglob("*"))
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", name) for name in names)


def metrics(job: Path) -> dict[str, float]:
    return json.loads((job / "metrics.json").read_text())


def assert_same_results(ours: dict[str, float], theirs: dict[str, float]) -> None:
    """Every message of every split evaluated once (no repeats from a distributed
    sampler), the same predictions, losses within float32 summation order (another order
    of the same sums moves them by ~1e-8 to 1e-7, too little to change a prediction),
    and whole parameter counts."""
    assert (ours["train/examples"], ours["val/examples"], ours["test/examples"]) == (
        1045, 149, 300)  # fmt: skip
    for key, value in theirs.items():
        if key.endswith(("acc", "precision", "recall", "f1", "examples")):
            assert ours[key] == value, key
        elif key.endswith("loss"):
            assert ours[key] == pytest.approx(value, abs=1e-5), key
    assert (ours["params/trainable"], ours["params/total"]) == (
        theirs["params/trainable"], theirs["params/total"])  # fmt: skip


def test_ddp_sim_sweep_is_one_sweep_and_matches_one_process_runs(tmp_path, sms_file):
    """`-m trainer=ddp_sim` over two fine-tuning methods: one sweep, one folder and one
    metrics.json per job, every message evaluated once, and the same results as
    one-process runs with the global batch (2 processes x 8 = 16)."""
    # float32 whatever the CPU (precision=auto picks bf16-mixed where bfloat16 is fast).
    jobs = ("freeze=last_block,lora", "trainer.max_epochs=1", "trainer.precision=32-true")
    ok(run_train(tmp_path / "ref", sms_file, *jobs, "data.batch_size=16", multirun=True))
    ddp = ok(run_train(tmp_path / "ddp", sms_file, *jobs, "trainer=ddp_sim", multirun=True))
    sweep, ref_sweep = tmp_path / "ddp" / "sweep", tmp_path / "ref" / "sweep"
    # One sweep: launched once (a rank re-running `-m` would launch again), two job
    # folders, two summary rows.
    output = ddp.stdout + ddp.stderr
    assert output.count("Launching 2 jobs") == 1, output[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["freeze=last_block", "freeze=lora"]
    for job in ("0", "1"):
        # Same data order and global batches (two 8-example means averaged by DDP
        # instead of one 16-example mean).
        assert_same_results(metrics(sweep / job), metrics(ref_sweep / job))
        # Files once, by the first process; the second one only has its own log.
        assert tree(sweep / job) == sorted([*tree(ref_sweep / job), "train_ddp_process_1.log"])
    # The prefix pass split between the processes: together one pass.
    counts = []
    for log_name in ("train.log", "train_ddp_process_1.log"):
        text = (sweep / "0" / log_name).read_text()
        found = re.search(r"process \d of 2: computed (\d+) of (\d+) distinct", text)
        assert found, text[-2000:]
        counts.append((int(found[1]), int(found[2])))
    (mine, total), (theirs, total_1) = counts
    assert total == total_1 and mine + theirs == total and abs(mine - theirs) <= 1


def test_trainer_fsdp_is_lightnings_strategy_per_block_and_needs_gpus(tmp_path):
    """What FSDP is on this CPU-only machine: its config builds Lightning's strategy with
    one unit per block (activation checkpointing by the same rule), sharded checkpoints
    (read back in test_use.py), and a run on the CPU is refused before any work."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from gpt_classifier.model.gpt import TransformerBlock
    from gpt_classifier.tasks.components import build_trainer
    from gpt_classifier.tasks.errors import ConfigError

    with initialize_config_dir(str(Path(__file__).parents[1] / "configs"), version_base="1.3"):
        overrides = ["trainer=fsdp", "model=gpt2-tiny", "accelerator=cpu", "trainer.devices=2",
                     "~logger",
                     "model.activation_checkpointing=true",
                     # Outside a Hydra app: no ${hydra:runtime.cwd} to resolve.
                     f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"]  # fmt: skip
        cfg = compose("train", overrides)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TransformerBlock}
    assert strategy.kwargs["use_orig_params"] is True
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert checkpointed._module_classes == {TransformerBlock}
    assert strategy._state_dict_type == "sharded"
    with pytest.raises(ConfigError, match="accelerator=cpu, trainer.devices=2: .*requires a GPU"):
        build_trainer(cfg, tmp_path, [])


# trainer=fsdp with 2 CPU processes on gloo: Lightning's FSDP past its GPU-only checks
# (tests/cpu_fsdp.py, importable with tests/ on PYTHONPATH).
CPU_FSDP = ("trainer=fsdp", "trainer.devices=2",
            "trainer.strategy._target_=cpu_fsdp.cpu_fsdp_strategy",
            "trainer.strategy.process_group_backend=gloo")  # fmt: skip


def test_trainer_fsdp_trains_like_ddp_and_resumes_from_its_shards(tmp_path, sms_file,
                                                                  monkeypatch):  # fmt: skip
    """`trainer=fsdp` on 2 CPU processes (tests/cpu_fsdp.py), with activation
    checkpointing: one epoch, then `ckpt_path=last` (a folder of shards) to a second,
    ends with the same metrics as two uninterrupted epochs of `trainer=ddp_sim`. The
    sharded checkpoints load and export as one model."""
    from gpt_classifier.inference import TextClassifier

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    common = ("freeze=all", "trainer.precision=32-true", "trainer.limit_train_batches=20")
    ok(run_train(tmp_path / "ddp", sms_file, *common, "trainer=ddp_sim", "trainer.max_epochs=2"))
    fsdp = (*common, *CPU_FSDP, "model.activation_checkpointing=true")
    first = ok(run_train(tmp_path / "fsdp", sms_file, *fsdp, "trainer.max_epochs=1"))
    assert "Frozen weights stay in FSDP's checkpoints" in first.stdout + first.stderr
    run = tmp_path / "fsdp" / "run"
    best = Path(metrics(run)["best_checkpoint"])
    assert best.is_dir() and any(best.glob("*.distcp"))
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    assert not (run / "checkpoints" / "frozen.safetensors").exists()
    exported = TextClassifier.load(best).export(tmp_path / "export")
    texts = ["WINNER! Claim your free prize now", "see you at lunch"]
    torch.testing.assert_close(TextClassifier.load(exported).probabilities(texts),
                               TextClassifier.load(best).probabilities(texts))  # fmt: skip

    resumed = ok(run_train(tmp_path / "fsdp", sms_file, *fsdp, "trainer.max_epochs=2",
                           "ckpt_path=last"))  # fmt: skip
    assert "(epoch 0, step 20)" in resumed.stdout + resumed.stderr
    # The same batches and gradients as DDP (losses measured 3e-8 apart), and the
    # parameters counted before FSDP sharded them, not one process's shards.
    assert_same_results(metrics(run), metrics(tmp_path / "ddp" / "run"))
    # eval.py reads the run's sharded best checkpoint (its settings from meta.pt).
    evaluated = tmp_path / "eval"
    ok(run_entry("eval.py", f"ckpt_path={run}", f"hydra.run.dir={evaluated}"))
    assert metrics(evaluated)["acc"] == pytest.approx(metrics(run)["test/acc"], abs=1e-6)

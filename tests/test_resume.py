"""Crashes, signals and bad outputs: resume exactly, stop cleanly, keep what was saved."""

from __future__ import annotations

import csv
import errno
import functools
import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import pytest
import torch
from entry_points import ok, run_entry, run_train, start_entry
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf, open_dict

from gpt_classifier.checkpoints import checkpoint_header, find_checkpoint
from gpt_classifier.tasks.components import check_writable
from gpt_classifier.tasks.errors import ConfigError
from gpt_classifier.tasks.run_folder import resume_checkpoint
from gpt_classifier.training.resume import (
    AtomicCheckpointIO,
    CheckpointSaveError,
    ResumeState,
)

REPO = Path(__file__).resolve().parents[1]
# trainer.limit_train_batches of the runs below: each signal comes 20 steps into an epoch,
# and the 100 steps after it (about a second of gpt2-tiny) keep it inside training even
# when the test's own process is slow to send it (with 60, a signal once landed in the
# epoch's validation).
STEPS_PER_EPOCH = 120


def command(sms_file: Path, run_dir: Path, *extra: str, epochs: int = 2) -> list[str]:
    """A gpt2-tiny run of 60-step epochs with a step checkpoint every 20 steps."""
    return ["train.py", "model=gpt2-tiny", "accelerator=cpu",
            f"data.path={sms_file}", f"trainer.max_epochs={epochs}",
            f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
            "callbacks.progress_bar.refresh_rate=0",
            "callbacks.step_checkpoint.every_n_train_steps=20", f"hydra.run.dir={run_dir}",
            *extra]  # fmt: skip


def final_metrics(run_dir: Path) -> dict[str, float]:
    """metrics.json without timings and paths: what must not depend on interruptions."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items()
            if not k.startswith("time/") and k != "best_checkpoint"}  # fmt: skip


def curves(run_dir: Path) -> dict:
    stored = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in stored["callbacks"].items() if "TrainingCurves" in k]
    return state


def interrupt_at(args: list[str], run_dir: Path, step: int, how: int) -> subprocess.Popen:
    """Start a run and send it ``how`` once its step checkpoint has passed ``step``."""
    process = start_entry(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = run_dir / "checkpoints" / "step.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if checkpoint.is_file():
            try:
                stored = torch.load(checkpoint, weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - being replaced right now; look again
                stored = {"global_step": -1}
            if stored["global_step"] >= step:
                process.send_signal(how)
                return process
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no step checkpoint past step {step} within 300 s")


# LoRA on the last block: adapters and the prefix cache (the frozen blocks below) at once.
LORA = ("freeze=lora", "freeze.blocks=1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sms_file) -> Path:
    """The uninterrupted run the interrupted ones must equal."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    ok(run_entry(*command(sms_file, run_dir, *LORA)))
    return run_dir


def test_sigterm_and_ctrl_c_write_a_checkpoint_and_say_how_to_resume(reference, sms_file, tmp_path):
    run_dir = tmp_path / "run"
    args = command(sms_file, run_dir, *LORA)
    resume = ["train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"]
    process = interrupt_at(args, run_dir, 20, signal.SIGTERM)  # in the first epoch
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Training stopped by SIGTERM" in output
    assert f"python train.py ckpt_path=last hydra.run.dir={run_dir}" in output
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    assert interrupted.is_file(), output[-3000:]
    stopped_at = torch.load(interrupted, weights_only=True, mmap=True)["global_step"]
    assert stopped_at >= 20

    # Resumed, then Ctrl-C in the second epoch, then resumed to the end. The signal waits
    # for a step checkpoint of the resumed run: on a loaded machine the first run may have
    # written one past the second epoch's step 20 before its SIGTERM took effect.
    target = max(STEPS_PER_EPOCH + 20, stopped_at + 20)
    assert target < 2 * STEPS_PER_EPOCH, f"the first run stopped only at step {stopped_at}"
    process = interrupt_at(resume, run_dir, target, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "Training stopped by SIGINT" in output
    ok(run_entry(*resume))
    assert final_metrics(run_dir) == final_metrics(reference)
    assert curves(run_dir) == curves(reference)  # every epoch's loss and accuracy, exactly
    # TensorBoard continued in its folder rather than starting a second one.
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()] == []
    assert "Prefix cache: reused" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("step", [30, STEPS_PER_EPOCH - 1], ids=["mid-epoch", "last-batch"])
def test_sigterm_after_a_steps_callbacks_stops_as_exactly_as_one_during_it(
    reference, sms_file, tmp_path, step
):
    # Lightning flags a SIGTERM and stops at the end of the step, after every
    # on_train_batch_end, without a checkpoint; in one process GracefulStop takes such a
    # signal over: the next step ends with a checkpoint like any other. If the next step
    # is the epoch's last (a checkpoint there would resume to other results), the epoch's
    # validation stops instead, and the run resumes from its furthest checkpoint.
    run_dir = tmp_path / "run"
    sigterm = ["+callbacks.sigterm._target_=tests.signal_callbacks.SignalAfterStepCallbacks",
               f"+callbacks.sigterm.marker={tmp_path / 'sent'}",
               f"+callbacks.sigterm.step={step}"]  # fmt: skip
    result = run_entry(*command(sms_file, run_dir, *LORA, *sigterm))
    output = result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGTERM, output[-3000:]
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    if step + 1 < STEPS_PER_EPOCH:
        assert f"Training stopped by SIGTERM at epoch 0, step {step + 1}" in output
        assert torch.load(interrupted, weights_only=True, mmap=True)["global_step"] == step + 1
    else:
        assert "Training stopped by SIGTERM outside a training step (in a validation" in output
        assert not interrupted.exists()
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert final_metrics(run_dir) == final_metrics(reference)


def test_sigterm_during_validation_exits_143_and_resumes_to_the_same_result(
    reference, sms_file, tmp_path
):
    # Lightning's own SIGTERM check stops a validation with an exit status of 0 unless
    # train.py turns it into 143. The furthest checkpoint is then the last step checkpoint
    # before the epoch's end (none is written at its last batch).
    run_dir = tmp_path / "run"
    sigterm = ["+callbacks.sigterm._target_=tests.signal_callbacks.SignalInValidation",
               f"+callbacks.sigterm.marker={tmp_path / 'sent'}"]  # fmt: skip
    result = run_entry(*command(sms_file, run_dir, *LORA, *sigterm))
    output = result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Training stopped by SIGTERM outside a training step (in a validation" in output
    assert "at epoch 0, step 120" in output
    stored = torch.load(run_dir / "checkpoints" / "step.ckpt", weights_only=True, mmap=True)
    assert stored["global_step"] == STEPS_PER_EPOCH - 20
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert final_metrics(run_dir) == final_metrics(reference)


def test_sigterm_during_the_prefix_pass_stops_there_and_resumes_to_the_same_result(
    sms_file, tmp_path
):
    # The signal comes as training starts, before the one pass over the frozen prefix: the
    # run stops at the pass's first batch, saves no partial cache,
    # and the resume makes the pass and the run whole.
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    sigterm = [
        "+callbacks.sigterm._target_=tests.signal_callbacks.SignalAtTrainStart",
        f"+callbacks.sigterm.marker={tmp_path / 'sent'}",
        f"paths.cache_dir={cache}",
    ]
    result = run_entry(*command(sms_file, run_dir, *LORA, *sigterm))
    output = result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Training stopped by SIGTERM at epoch 0, step 0" in output
    assert "Prefix cache: computed" not in output
    assert not list(cache.rglob("prefix-*.safetensors"))
    log_lines = (run_dir / "train.log").read_text().splitlines()
    stamps = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in log_lines
              if "SIGTERM received" in line or "Training stopped by SIGTERM" in line]  # fmt: skip
    assert len(stamps) == 2 and (stamps[1] - stamps[0]).total_seconds() < 5
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    # The same run uninterrupted, its prefix computed from a cold cache too (under
    # bfloat16 the stored prefix depends a little on how the pass batched the messages).
    twin = tmp_path / "twin"
    ok(run_entry(*command(sms_file, twin, *LORA, f"paths.cache_dir={tmp_path / 'twin-cache'}")))
    assert final_metrics(run_dir) == final_metrics(twin)


def test_ctrl_c_during_the_last_validation_skips_the_final_test_and_says_how_to_run_it(
    reference, sms_file, tmp_path
):
    run_dir = tmp_path / "run"
    ctrl_c = ["+callbacks.ctrl_c._target_=tests.signal_callbacks.SignalInValidation",
              f"+callbacks.ctrl_c.marker={tmp_path / 'sent'}", "+callbacks.ctrl_c.signum=SIGINT",
              "+callbacks.ctrl_c.epoch=1"]  # fmt: skip
    result = run_entry(*command(sms_file, run_dir, *LORA, *ctrl_c))
    output = result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "SIGINT received after the last training step" in output
    assert not (run_dir / "metrics.json").exists()
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert final_metrics(run_dir) == final_metrics(reference)


def test_kill_9_then_resume_equals_the_uninterrupted_run(reference, sms_file, tmp_path):
    """kill -9 in the second epoch; the resume starts from the step checkpoint, mid-epoch."""
    run_dir = tmp_path / "run"
    process = interrupt_at(command(sms_file, run_dir, *LORA), run_dir, STEPS_PER_EPOCH + 20,
                           signal.SIGKILL)  # fmt: skip
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    # The run's best so far (its first epoch's), not its furthest (a step checkpoint), is
    # what predict.py, eval.py and export.py take from the unfinished run's folder.
    assert find_checkpoint(run_dir, best=True).name == "best-epoch00.ckpt"
    assert find_checkpoint(run_dir).name != "best-epoch00.ckpt"
    splits = {p.name: p.stat().st_mtime_ns for p in (run_dir / "splits").iterdir()}
    # Only the run folder: the run's own config comes from run_config.yaml.
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert final_metrics(run_dir) == final_metrics(reference)
    assert curves(run_dir) == curves(reference)
    # splits/ is the run's first start's, never rewritten within the run.
    assert splits == {p.name: p.stat().st_mtime_ns for p in (run_dir / "splits").iterdir()}
    assert final_metrics(run_dir)["params/trainable"] < 50_000  # LoRA's adapters and head


def test_validating_twice_an_epoch_resumes_exactly_after_a_kill_9(sms_file, tmp_path):
    """``trainer.val_check_interval=0.5`` (large data): killed in the second epoch after
    its mid-epoch validation, the resume ends as the uninterrupted run does."""
    twice = (*LORA, "trainer.val_check_interval=0.5")
    ok(run_entry(*command(sms_file, tmp_path / "reference", *twice)))
    run_dir = tmp_path / "run"
    process = interrupt_at(command(sms_file, run_dir, *twice), run_dir,
                           STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2 + 20, signal.SIGKILL)  # fmt: skip
    assert process.wait(timeout=60) == -signal.SIGKILL
    ok(run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={run_dir}"))
    assert final_metrics(run_dir) == final_metrics(tmp_path / "reference")
    assert curves(run_dir) == curves(tmp_path / "reference")


def test_two_runs_sharing_a_cold_prefix_cache_get_their_results_alone(sms_file, tmp_path):
    """Started together on one empty cache folder (both compute the prefix, both save
    it), each ends with what it gets alone: three processes, one seed, the same numbers.
    One thread each: two processes spinning two threads each on a 2-core machine would
    take three times as long."""
    # One cache folder for all three: the first run's precision=auto measurement is the
    # others' (measured by each under load, one of them once trained in float32).
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "GPT_CLASSIFIER_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    alone = tmp_path / "alone"
    ok(run_entry(*command(sms_file, alone, "prefix_cache.persist=false", epochs=1), env=env))
    assert not list((tmp_path / "cache" / "prefix_cache").glob("*"))
    runs = [tmp_path / "a", tmp_path / "b"]
    processes = [
        start_entry(*command(sms_file, d, epochs=1), env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)
        for d in runs
    ]  # fmt: skip
    for process in processes:
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
    for run_dir in runs:
        assert final_metrics(run_dir) == final_metrics(alone)
    assert len(list((tmp_path / "cache" / "prefix_cache").glob("prefix-*.safetensors"))) == 1


# ----------------------------------------------------------------------------- units


def test_a_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"last.ckpt: No space left on device "
                       r"\(the previous last.ckpt is intact\).*ckpt_path=last"):  # fmt: skip
        io.save_checkpoint({"global_step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_unwritable_output_folders_fail_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = OmegaConf.create({"callbacks": {"model_checkpoint": {"dirpath": str(blocker / "ck")}}})
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.dirpath=.*a-file/ck "
                       r"cannot be written"):  # fmt: skip
        check_writable(cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"hydra.run.dir \(the output folder\)=.*cannot"):
        check_writable(OmegaConf.create({}), blocker / "out")
    check_writable(OmegaConf.create({}), tmp_path / "fine")
    assert list((tmp_path / "fine").iterdir()) == []  # the probe is gone


def test_a_run_folder_is_trained_in_by_one_process_at_a_time(tmp_path):
    """Two runs started in the same second share one dated folder: both trained there,
    each exited 0, and the folder held one's config with the other's metrics."""
    import sys

    from gpt_classifier.tasks import run_folder

    holds = ("import sys, time; from pathlib import Path; from gpt_classifier.tasks.run_folder "
             "import claim_run_folder; claim_run_folder(Path(sys.argv[1])); print('held', "
             "flush=True); time.sleep(120)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", holds, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"another process is training in {tmp_path} now"):
            run_folder.claim_run_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    run_folder.claim_run_folder(tmp_path)  # the lock went with its process
    run_folder._CLAIMED.pop().release()


def test_a_finished_run_is_not_trained_again(tmp_path):
    from gpt_classifier.tasks.run_folder import finished_run

    (tmp_path / "metrics.json").write_text(json.dumps({"val/acc": 0.9}))

    def cfg(max_epochs, patience=None):
        stopping = {"early_stopping": {"patience": patience}}
        return OmegaConf.create({"trainer": {"max_epochs": max_epochs}, "callbacks": stopping,
                                 "optimize_metric": "val/acc"})  # fmt: skip

    assert finished_run(cfg(2), tmp_path, {"epochs_done": 2}) == 0.9
    assert finished_run(cfg(3), tmp_path, {"epochs_done": 2}) is None  # train further
    assert finished_run(cfg(-1), tmp_path, {"epochs_done": 2}) is None  # no epoch limit
    assert finished_run(cfg(2), tmp_path / "other", {"epochs_done": 2}) is None  # no metrics
    # Ended by early stopping: finished, unless the command raises the patience or turns
    # early stopping off (it once trained another epoch and rewrote metrics.json).
    stopped = {"epochs_done": 2, "early_stopping_wait": 1}
    assert finished_run(cfg(5, 1), tmp_path, stopped) == 0.9
    assert finished_run(cfg(-1, 1), tmp_path, stopped) == 0.9
    assert finished_run(cfg(5, 3), tmp_path, stopped) is None
    assert finished_run(cfg(5), tmp_path, stopped) is None


def test_ckpt_path_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path=last: no checkpoint .* hydra.run.dir"):
        resume_checkpoint("last", tmp_path)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*nope.ckpt does not exist"):
        resume_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")  # an export or a Hub folder
    with pytest.raises(ConfigError, match=r"To train from its weights, give model.weights="):
        resume_checkpoint(str(tmp_path / "weights"), tmp_path)


@pytest.fixture
def composed():
    """train.yaml composed as a command with these overrides composes it, Hydra's state set
    as under that command (and cleared afterwards, for later tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def compose_train(*overrides: str):
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield compose_train
    HydraConfig.instance().cfg = None


def test_a_resume_keeps_the_runs_config_and_applies_plain_overrides(tmp_path, composed):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    _check_resume_config(composed, run_dir, run_dir / "checkpoints" / "last.ckpt")


def _check_resume_config(composed, run_dir: Path, checkpoint: Path) -> None:
    from gpt_classifier.tasks.run_config import (
        ResumeConfigError,
        config_for_resume,
        save_run_config,
    )

    save_run_config(composed("model=gpt2-tiny", "freeze=lora", "optimizer.lr=1e-4"), run_dir,
                    {"trainer.precision": "bf16-mixed"})  # fmt: skip

    resumed = config_for_resume(composed("ckpt_path=last", "trainer.max_epochs=9"), checkpoint)
    assert resumed.model.name == "gpt2-tiny" and resumed.freeze.rank == 16
    # precision=auto measured the CPU at the run's start: the resume trains on in what it chose
    assert resumed.trainer.precision == "bf16-mixed"
    chosen = config_for_resume(composed("ckpt_path=last", "trainer.precision=32-true"),
                               checkpoint)  # fmt: skip
    assert chosen.trainer.precision == "32-true"  # unless the command says otherwise
    assert resumed.optimizer.lr == 1e-4 and resumed.trainer.max_epochs == 9
    assert resumed.ckpt_path == str(checkpoint)
    with pytest.raises(ResumeConfigError, match="model=gpt2-small: the run in .* was trained "
                       "with model=gpt2-tiny; a resume keeps it"):  # fmt: skip
        config_for_resume(composed("ckpt_path=last", "model=gpt2-small"), checkpoint)
    # What would re-split the data within the run is refused, naming both values.
    for change, before in (("seed=999", "seed=123"), ("data.train_frac=0.6", "data.train_frac=0.7"),
                           ("data.seed=5", "data.seed=123")):  # fmt: skip
        with pytest.raises(ResumeConfigError, match=f"{change}: the run in .* was trained with "
                           f"{before}.* start a new run"):  # fmt: skip
            config_for_resume(composed("ckpt_path=last", change), checkpoint)
    # A run started when the accelerator group wrote accelerator.* resumes with trainer.*.
    record = OmegaConf.load(run_dir / "run_config.yaml")
    with open_dict(record):
        record.config.accelerator = {"accelerator": "cpu", "precision": "auto"}
        del record.config.trainer["accelerator"], record.config.trainer["precision"]
        record.resolved = {"accelerator.precision": "bf16-mixed"}
    OmegaConf.save(record, run_dir / "run_config.yaml")
    older = config_for_resume(composed("ckpt_path=last"), checkpoint)
    assert "accelerator" not in older
    assert (older.trainer.accelerator, older.trainer.precision) == ("cpu", "bf16-mixed")


class ScheduledAccuracy(L.LightningModule):
    """A linear model whose validation accuracy is whatever the schedule says per epoch."""

    def __init__(self, schedule: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.schedule = schedule

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self.schedule[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 4)),
                                           batch_size=2)  # fmt: skip

    val_dataloader = train_dataloader


def fit_scheduled(folder: Path, schedule: list[float],
                  ckpt_path: str | None = None) -> tuple[ModelCheckpoint, L.Trainer]:  # fmt: skip
    """Three steps an epoch, checkpoints as configs/callbacks/default.yaml makes them."""
    callbacks = OmegaConf.load(Path(__file__).parents[1] / "configs" / "callbacks" / "default.yaml")
    config = OmegaConf.merge({"optimize_metric": "val/acc"}, {"callbacks": callbacks})
    best, last = (instantiate(config.callbacks[name], dirpath=str(folder))
                  for name in ("model_checkpoint", "last_checkpoint"))  # fmt: skip
    trainer = L.Trainer(max_epochs=len(schedule), callbacks=[best, last], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()], accelerator="cpu")  # fmt: skip
    trainer.fit(ScheduledAccuracy(schedule), ckpt_path=ckpt_path)
    return best, trainer


def stored(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_best_and_last_checkpoints_follow_the_run_and_survive_a_resume(tmp_path):
    folder = tmp_path / "checkpoints"
    fit_scheduled(folder, [0.5, 0.7])
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch01.ckpt", "last.ckpt"]
    assert stored(folder / "last.ckpt")["global_step"] == 6
    assert find_checkpoint(tmp_path) == folder / "last.ckpt"  # the tie goes to last.ckpt

    # Resumed from last.ckpt: the best so far is known, so a worse epoch keeps it, and
    # last.ckpt moves on with the run.
    best, _ = fit_scheduled(folder, [0.5, 0.7, 0.6, 0.65], ckpt_path=str(folder / "last.ckpt"))
    assert best.best_model_path == str(folder / "best-epoch01.ckpt")
    assert float(best.best_model_score) == pytest.approx(0.7)
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch01.ckpt", "last.ckpt"]
    assert stored(folder / "last.ckpt")["global_step"] == 12
    assert stored(folder / "best-epoch01.ckpt")["global_step"] == 6


class WithOptimizerFactory(ScheduledAccuracy):
    """ScheduledAccuracy with its optimizer built from a factory, as ClassifierModule's."""

    def __init__(self, lr: float) -> None:
        super().__init__([0.5] * 3)
        self.optimizer_factory = functools.partial(torch.optim.SGD, lr=lr)

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())


def test_a_resume_trains_with_the_optimizer_values_it_is_given(tmp_path, composed):
    """Lightning restores the optimizer with the values it was saved with: a resume's
    optimizer.lr=... was logged as a change and then ignored."""
    from gpt_classifier.tasks.run_config import (
        ResumeConfigError,
        config_for_resume,
        save_run_config,
    )

    def fit(lr: float, epochs: int, ckpt_path: str | None = None) -> L.Trainer:
        trainer = L.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[ResumeState(), ModelCheckpoint(tmp_path, "last")],
        )
        trainer.fit(WithOptimizerFactory(lr), ckpt_path=ckpt_path)
        return trainer

    fit(0.1, 1)
    assert fit(0.1, 2, str(tmp_path / "last.ckpt")).optimizers[0].param_groups[0]["lr"] == 0.1
    assert fit(0.5, 3, str(tmp_path / "last.ckpt")).optimizers[0].param_groups[0]["lr"] == 0.5
    # Under a scheduler, whose state sets the learning rate, such a change is refused.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    save_run_config(composed("model=gpt2-tiny", "scheduler=cosine"), tmp_path / "run")
    with pytest.raises(ResumeConfigError, match="optimizer.lr=0.001: the run in .* has a "
                       "learning-rate scheduler"):  # fmt: skip
        config_for_resume(composed("ckpt_path=last", "optimizer.lr=1e-3"),
                          tmp_path / "run" / "checkpoints" / "last.ckpt")  # fmt: skip


def test_a_resume_mid_epoch_keeps_the_batches_that_epoch_is_drawn_in(tmp_path, composed):
    """The rest of an interrupted epoch is counted in batches as they were drawn: another
    data.batch_size there would skip other messages. At an epoch's end it may change."""
    from gpt_classifier.tasks.run_config import (
        ResumeConfigError,
        config_for_resume,
        save_run_config,
    )

    run, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step.ckpt"
    checkpoint.parent.mkdir(parents=True)
    save_run_config(composed("model=gpt2-tiny"), run)
    torch.save({"epoch": 1, "epochs_done": 1, "global_step": 150}, checkpoint)  # mid-epoch 2
    with pytest.raises(ResumeConfigError, match=r"data.batch_size=16: .*step.ckpt was saved in "
                       r"the middle of epoch 2, .*\(with data.batch_size=8\)"):  # fmt: skip
        config_for_resume(composed("ckpt_path=last", "data.batch_size=16"), checkpoint)
    assert config_for_resume(composed("ckpt_path=last", "data.eval_batch_size=64"), checkpoint)
    torch.save({"epoch": 1, "epochs_done": 2, "global_step": 260}, checkpoint)  # epoch 2's end
    resumed = config_for_resume(composed("ckpt_path=last", "data.batch_size=16"), checkpoint)
    assert resumed.data.batch_size == 16


def test_a_resume_takes_the_early_stopping_patience_it_is_given(tmp_path):
    """Lightning restores EarlyStopping's patience from the checkpoint: a resume's
    callbacks.early_stopping.patience=... was ignored."""
    from gpt_classifier.training.resume import RunEarlyStopping

    def fit(patience: int, folder: str, ckpt_path: str | None = None) -> int:
        stop = RunEarlyStopping(monitor="val/acc", mode="max", patience=patience)
        trainer = L.Trainer(
            max_epochs=10,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[stop, ModelCheckpoint(tmp_path / folder, "last")],
        )
        trainer.fit(ScheduledAccuracy([0.5] * 10), ckpt_path=ckpt_path)  # never improves
        return trainer.current_epoch

    first = fit(1, "first")  # stops once one epoch brings no improvement
    last = str(tmp_path / "first" / "last.ckpt")
    assert checkpoint_header(Path(last))["early_stopping_wait"] == 1  # finished_run reads it
    assert fit(1, "same", last) < fit(3, "more", last) < 10
    assert first < 10
    assert RunEarlyStopping(monitor="val/acc").state_key.startswith("EarlyStopping{")


def test_a_run_continued_into_a_new_folder_keeps_its_best_checkpoint(tmp_path):
    """``ckpt_path=<run>`` with another ``hydra.run.dir``: Lightning's ModelCheckpoint
    forgot the best so far when its folder changed, so the new folder's first checkpoint
    (0.6 here) became the best, and the final evaluation took it."""
    first, continued = tmp_path / "first" / "checkpoints", tmp_path / "continued" / "checkpoints"
    fit_scheduled(first, [0.5, 0.7])
    kept = {p: p.read_bytes() for p in first.iterdir()}
    best, _ = fit_scheduled(continued, [0.5, 0.7, 0.6, 0.65], ckpt_path=str(first / "last.ckpt"))
    assert best.best_model_path == str(first / "best-epoch01.ckpt")
    assert sorted(p.name for p in continued.iterdir()) == ["last.ckpt"]
    assert {p: p.read_bytes() for p in first.iterdir()} == kept  # nothing of it deleted
    # What predict.py, eval.py and export.py take from the continued run before it ends.
    assert find_checkpoint(continued.parent, best=True) == first / "best-epoch01.ckpt"
    # A better epoch in the new folder becomes the best; the earlier folder's file stays.
    best, _ = fit_scheduled(tmp_path / "again", [0.5, 0.7, 0.9], ckpt_path=str(first / "last.ckpt"))
    assert best.best_model_path == str(tmp_path / "again" / "best-epoch02.ckpt")
    assert {p: p.read_bytes() for p in first.iterdir()} == kept


def test_a_second_ctrl_c_stops_at_once_and_exits_130(tmp_path, caplog):
    """The first Ctrl-C asks for a checkpoint after the step; a second one stops at once:
    Lightning then exits 1 after its graceful shutdown, which becomes a shell's 130."""
    from gpt_classifier.training import signals

    stop = signals.GracefulStop()
    stop._on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)

    class Shutdown:  # what Lightning's fit does after a KeyboardInterrupt
        def fit(self, *args, **kwargs):
            raise SystemExit(1)

    with pytest.raises(SystemExit) as exited:
        signals.fit(Shutdown(), None, None, None, tmp_path, stop)
    assert exited.value.code == 130
    assert "second Ctrl-C" in caplog.text and f"hydra.run.dir={tmp_path}" in caplog.text


def test_a_run_keeps_its_local_files_by_absolute_path(tmp_path, monkeypatch):
    """What a run reads from disk, given relative to where it started, is kept absolute:
    eval.py and a resume started elsewhere find the same files. Hub names stay names."""
    from hydra import compose, initialize_config_dir

    from gpt_classifier.tasks.run_config import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("text,label\n")
    (tmp_path / "weights").mkdir()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data=files", "data.files.train=train.csv",
                                          "data.files.test=/abs/test.csv",
                                          "model.weights=weights"])  # fmt: skip
        hub = compose("train", overrides=["data=hf", "data.name=ag_news"])
    absolute_paths(cfg)
    absolute_paths(hub)
    assert cfg.data.files.train == str(tmp_path / "train.csv")
    assert cfg.data.files.test == "/abs/test.csv" and cfg.data.path is None
    assert cfg.model.weights == str(tmp_path / "weights")
    assert (hub.data.name, hub.model.weights) == ("ag_news", "gpt2")


def test_a_resume_may_name_the_runs_data_file_by_a_relative_path(
    tmp_path, monkeypatch, composed, caplog
):
    """The run keeps data.path absolute; the resume command may repeat it as first given."""
    from gpt_classifier.tasks.run_config import (
        ResumeConfigError,
        absolute_paths,
        config_for_resume,
        save_run_config,
    )

    monkeypatch.chdir(tmp_path)
    for name in ("sms.tsv", "other.tsv"):
        (tmp_path / name).write_text("ham\thi\n")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)

    started = composed("data.path=sms.tsv")
    absolute_paths(started)
    save_run_config(started, tmp_path / "run")
    with caplog.at_level("INFO", logger="gpt_classifier.tasks.run_config"):
        resumed = config_for_resume(composed("ckpt_path=last", "data.path=./sms.tsv",
                                             "trainer.max_epochs=3"), checkpoint)  # fmt: skip
    assert resumed.data.path == "./sms.tsv"  # the same file, not logged as a change
    assert "changed by this command: trainer.max_epochs: 5 -> 3" in caplog.text
    assert "data.path:" not in caplog.text
    with pytest.raises(ResumeConfigError, match="data.path=other.tsv: the run in"):
        config_for_resume(composed("ckpt_path=last", "data.path=other.tsv"), checkpoint)


def test_a_resume_keeps_what_own_data_is_read_by(tmp_path, monkeypatch, composed):
    """Columns, files and dataset of data=files and data=hf are the run's, as data.path is:
    another would train on other texts than the run's split holds."""
    from gpt_classifier.tasks.run_config import (
        ResumeConfigError,
        absolute_paths,
        config_for_resume,
        save_run_config,
    )

    monkeypatch.chdir(tmp_path)
    for name in ("train.csv", "test.csv", "other.csv"):
        (tmp_path / name).write_text("text,label\nhi,a\n")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    started = composed("data=files", "data.files.train=train.csv", "data.files.test=test.csv")
    absolute_paths(started)
    save_run_config(started, tmp_path / "run")
    resumed = config_for_resume(composed("ckpt_path=last", "data=files",
                                         "data.files.train=./train.csv"), checkpoint)  # fmt: skip
    assert resumed.data.files.train == "./train.csv"  # the same file
    changes = [
        ("data.text_column=body", "data.text_column=text"),
        ("data.label_column=y", "data.label_column=label"),
        ("data.files.test=other.csv", f"data.files.test={tmp_path}/test.csv"),
        ("data.files.validation=b.csv", "data.files.validation=None"),
    ]
    for change, before in changes:
        with pytest.raises(ResumeConfigError, match=f"{change}: the run in .* was trained with "
                           f"{before}, and changing it"):  # fmt: skip
            config_for_resume(composed("ckpt_path=last", "data=files", change), checkpoint)
    # A file moved since: the run goes on with it where it is now.
    (tmp_path / "test.csv").rename(tmp_path / "moved.csv")
    moved = config_for_resume(composed("ckpt_path=last", "data=files",
                                       "data.files.test=moved.csv"), checkpoint)  # fmt: skip
    assert moved.data.files.test == "moved.csv"


def test_a_new_run_in_an_earlier_runs_folder_is_refused_before_any_work(
    trained_run, sms_file, tmp_path
):
    """Without ckpt_path, training into a folder that holds a run would mix its checkpoints
    with that run's, under that run's run_config.yaml (which a resume then follows)."""
    import shutil

    earlier = tmp_path / "run"
    shutil.copytree(trained_run, earlier)
    kept = {p: p.read_bytes() for p in earlier.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}  # fmt: skip
    refused = run_entry("train.py", "model=gpt2-tiny", "freeze=last_layer", "accelerator=cpu",
                        f"data.path={sms_file}", f"hydra.run.dir={earlier}")  # fmt: skip
    assert refused.returncode != 0
    assert f"the output folder {earlier} holds a run already (run_config.yaml" in refused.stderr
    assert f"ckpt_path=last hydra.run.dir={earlier}" in refused.stderr
    assert {p: p.read_bytes() for p in kept} == kept  # nothing of it changed, nothing added
    assert {p for p in earlier.rglob("*") if p.is_file() and ".hydra" not in p.parts} == {
        *kept, earlier / "train.log"}  # fmt: skip


def test_a_start_that_fails_its_checks_leaves_its_folder_free_for_the_fixed_command(
    sms_file, tmp_path
):
    """A run that stops on a bad setting before training (here the last check, the head
    against the data's labels) keeps no run_config.yaml: the same command, fixed, trains
    in that folder instead of being refused as a second run there."""
    run = tmp_path / "run"
    fixed = ["train.py", "model=gpt2-tiny", "accelerator=cpu", f"data.path={sms_file}",
             f"hydra.run.dir={run}", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
             "callbacks.progress_bar.refresh_rate=0"]  # fmt: skip
    failed = run_entry(*fixed, "classifier.num_classes=3")
    assert failed.returncode != 0 and "\nConfigError: classifier.num_classes=3" in failed.stderr
    assert "Traceback" not in failed.stderr  # a message to act on, not our frames
    assert not (run / "run_config.yaml").exists()
    ok(run_entry(*fixed))
    assert (run / "run_config.yaml").is_file() and (run / "metrics.json").is_file()


def test_a_folder_whose_run_saved_no_checkpoint_is_not_offered_for_resuming(tmp_path):
    """Refusing a new run in a folder whose run never saved a checkpoint (killed in the
    prefix pass) says to delete it or use another, not ``ckpt_path=last``, which fails."""
    from gpt_classifier.tasks.run_folder import check_new_run_folder

    (tmp_path / "run_config.yaml").write_text("config: {}\n")
    with pytest.raises(ConfigError, match="it saved no checkpoint to resume from: delete") as err:
        check_new_run_folder(tmp_path)
    assert "ckpt_path=last" not in str(err.value)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"ckpt_path=last hydra.run.dir={tmp_path}"):
        check_new_run_folder(tmp_path)


def test_run_checkpoints_keep_lightnings_state_key():
    """Checkpoints saved with Lightning's ModelCheckpoint resume into RunCheckpoint (and the
    other way round): Lightning finds a callback's state by its key, named for its class."""
    from gpt_classifier.training.resume import RunCheckpoint, StepCheckpoint

    for kwargs in ({"monitor": "val/acc", "mode": "max"}, {"monitor": None}):
        assert RunCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
    assert StepCheckpoint(dirpath="c").state_key.startswith("StepCheckpoint{")  # its own, as ever


def test_a_resume_that_changes_keys_records_them_for_later_resumes(tmp_path, composed):
    """A run extended with trainer.max_epochs=2 and stopped again goes on to epoch 2 with
    a plain ckpt_path=last, and its model card's command says trainer.max_epochs=2."""
    from gpt_classifier.tasks.run_config import config_for_resume, save_run_config

    run_dir, precision = tmp_path / "run", {"trainer.precision": "bf16-mixed"}
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    save_run_config(composed("model=gpt2-tiny", "trainer.max_epochs=1", "optimizer.lr=1e-4"),
                    run_dir, precision)  # fmt: skip
    record = run_dir / "run_config.yaml"
    first = record.read_text()
    # A resume that changes nothing leaves the record as it was.
    save_run_config(config_for_resume(composed("ckpt_path=last"), checkpoint), run_dir, precision)
    assert record.read_text() == first
    extended = config_for_resume(composed("ckpt_path=last", "trainer.max_epochs=2"), checkpoint)
    save_run_config(extended, run_dir, precision)
    saved = OmegaConf.load(record)
    assert saved.overrides == ["model=gpt2-tiny", "optimizer.lr=1e-4", "trainer.max_epochs=2"]
    assert saved.config.trainer.max_epochs == 2 and saved.config.ckpt_path is None
    later = config_for_resume(composed("ckpt_path=last"), checkpoint)
    assert later.trainer.max_epochs == 2 and later.trainer.precision == "bf16-mixed"
    # A precision the resume sets replaces the one precision=auto chose, for later resumes too.
    chosen = config_for_resume(composed("ckpt_path=last", "trainer.precision=32-true"),
                               checkpoint)  # fmt: skip
    save_run_config(chosen, run_dir, {"trainer.precision": "32-true"})
    assert config_for_resume(composed("ckpt_path=last"), checkpoint).trainer.precision == "32-true"
    assert OmegaConf.load(record).config.optimizer.lr == 1e-4


def test_a_sweep_resumed_keeps_its_finished_jobs_and_runs_the_others(tmp_path, sms_file):
    """A sweep stopped by Ctrl-C has jobs that never ran: its command with ckpt_path=last
    keeps what finished, resumes what was interrupted, and starts the rest."""
    from gpt_classifier.training.signals import _resume_hint

    short = ("trainer.max_epochs=1", "trainer.limit_train_batches=5")
    # In a new folder (hydra.sweep.dir forgotten) there is no sweep to resume: said, not run.
    new = run_train(tmp_path / "new", sms_file, *short, "seed=5", "ckpt_path=last",
                    multirun=True)  # fmt: skip
    assert new.returncode != 0 and not (tmp_path / "new" / "sweep" / "0" / "metrics.json").exists()
    assert "fix: hydra.sweep.dir=<the folder of the sweep to resume>" in new.stderr
    ok(run_train(tmp_path, sms_file, *short, "seed=5", multirun=True))
    sweep = tmp_path / "sweep"
    first = (sweep / "0" / "metrics.json").read_bytes()
    assert f"hydra.sweep.dir={sweep}" in _resume_hint(sweep / "0")  # what a stopped job says
    assert "hydra.sweep.dir" not in _resume_hint(tmp_path / "run")
    ok(run_train(tmp_path, sms_file, *short, "seed=5,6", "ckpt_path=last", multirun=True))
    assert "already finished" in (sweep / "0" / "train.log").read_text()
    assert (sweep / "0" / "metrics.json").read_bytes() == first
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["overrides"] for r in rows) == ["seed=5", "seed=6"]
    # The job that started records the overrides that made it, not ckpt_path=last.
    recorded = OmegaConf.load(sweep / "1" / "run_config.yaml").overrides
    assert "seed=6" in recorded and not any(o.startswith("ckpt_path") for o in recorded)

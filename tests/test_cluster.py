"""Clusters: the SLURM job that `hydra/launcher=submitit_slurm` submits, and a requeued
job resuming by itself. (A sweep through submitit's local executor: test_training.py.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from entry_points import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

submitit = pytest.importorskip("submitit", reason="pip install -e '.[slurm]'")


def sbatch_script(tmp_path: Path, *overrides: str) -> str:
    """The batch script submitit would hand to sbatch for a job of this config,
    made the way hydra-submitit-launcher's ``launch`` makes it (nothing submitted)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", [f"hydra.sweep.dir={tmp_path}", *overrides],
                      return_hydra_config=True)  # fmt: skip
    cfg.hydra.runtime.output_dir = str(tmp_path)  # what Hydra sets when a job runs
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"), cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )  # fmt: skip
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python job.py", "uid")


def test_slurm_jobs_get_a_task_per_device_and_the_preemption_signal(tmp_path, monkeypatch):
    # submitit's SLURM executor looks for srun before it writes anything.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = sbatch_script(
        tmp_path, "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=8",
        "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600",
    )  # fmt: skip
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))
    assert options["nodes"] == "2"
    assert options["ntasks-per-node"] == "8"  # one task per device: Lightning's ranks
    assert options["gpus-per-node"] == "8"
    assert options["partition"] == "gpu"
    assert options["time"] == "600"
    # SLURM warns with SIGUSR2 two minutes ahead; GracefulStop checkpoints on it and
    # submitit requeues.
    assert options["signal"] == "USR2@120"
    assert "srun" in script


def test_a_requeued_slurm_job_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    """SLURM restarts a requeued job with the same command (SLURM_RESTART_COUNT > 0):
    with checkpoints in its folder it continues as `ckpt_path=last` would (whose
    resume is tested end to end in test_resume.py); without, it starts afresh."""
    from gpt_classifier.tasks.run_folder import requeued_run

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step.ckpt").write_bytes(b"")
    assert requeued_run(tmp_path) is None  # a first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeued_run(tmp_path) == "last"
    assert requeued_run(tmp_path / "elsewhere") is None  # nothing to resume from


def test_sigusr2_checkpoints_then_hands_over_to_submitits_requeue(tmp_path):
    """SLURM (through submitit) warns with SIGUSR2: training stops after the step with a
    checkpoint, and submitit's handler (requeue the job) comes after it, not before."""
    import signal
    from types import SimpleNamespace

    from gpt_classifier.training.signals import GracefulStop, TrainingInterrupted

    requeued = []

    def submitit_handler(signum, frame):
        requeued.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    saved = []
    trainer = SimpleNamespace(
        received_sigterm=False, accumulate_grad_batches=1, num_training_batches=10,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda asked, all: asked),
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)), default_root_dir=str(tmp_path),
        save_checkpoint=saved.append,
    )  # fmt: skip
    stop = GracefulStop()
    try:
        stop.on_fit_start(trainer, None)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert requeued == []  # not yet: no checkpoint so far
        with pytest.raises(TrainingInterrupted) as raised:
            stop.on_train_batch_end(trainer, None, None, None, 0)
    finally:
        stop.teardown(trainer, None, "fit")
        restored = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, previous)
    assert saved == [tmp_path / "interrupted.ckpt"]
    assert raised.value.signum == signal.SIGUSR2
    raised.value.then(signal.SIGUSR2, None)  # what train() does once Lightning let go
    assert requeued == [signal.SIGUSR2]
    assert restored is submitit_handler  # back in place after training

"""Survive crashes and signals: step checkpoints, safe saves, exact resume.

- :class:`StepCheckpoint` rewrites ``checkpoints/step.ckpt`` every minute of training
  (or every N optimizer steps), so a crash loses about a minute of work.
- :class:`AtomicCheckpointIO` writes every checkpoint through a unique temporary file
  and ``os.replace``: a full disk or a permission error leaves the previous one intact.
- :class:`ResumeState` puts the random generators' states and the completed epochs into
  each checkpoint, so a resumed run draws what the uninterrupted run would have drawn
  (the mid-epoch data order itself is kept by ``data.batching.ResumableLoader``).
- :class:`GracefulStop` turns SIGINT (Ctrl-C) and SIGTERM (what schedulers send) into a
  checkpoint after the current optimizer step and :class:`TrainingInterrupted`.
- :func:`find_checkpoint` picks the checkpoint ``ckpt_path=last`` means.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from gpt_classifier.checkpoints import settings_file
from gpt_classifier.files import atomic_path

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


def _preemption_signals() -> tuple[int, ...]:
    """submitit's preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default); none
    where the platform lacks it (Windows)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    found = getattr(signal, name, None)
    return (found,) if found is not None else ()


PREEMPTION_SIGNALS = _preemption_signals()


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names it and what is left."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path | None, then: Any = None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        # The handler the signal had before training (submitit's requeue for SIGUSR2):
        # called once the checkpoint is written and Lightning has let go.
        self.then = then if callable(then) else None
        super().__init__(f"{signal.Signals(signum).name}; checkpoint {checkpoint}")


def mid_accumulation(trainer: L.Trainer) -> bool:
    """Whether gradients of the current step are still being accumulated: a checkpoint
    now would lose them (they are not part of any checkpoint)."""
    if trainer.accumulate_grad_batches == 1:
        return False
    return bool(trainer.fit_loop.epoch_loop._should_accumulate())  # Lightning's own test


# ----------------------------------------------------------------------------- saving


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a unique temporary file beside the target, then ``os.replace``.

    Lightning's own writer truncates the target before writing it, so a full disk or a
    crash mid-write destroys the only checkpoint; this one never touches it until the
    new file is complete. Remote paths (``s3://...``) keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as err:
            kept = (f"the previous {path.name} is intact" if path.is_file()
                    else "there was no earlier file of that name")  # fmt: skip
            raise CheckpointSaveError(
                f"could not write checkpoint {path}: {err.strerror or err} ({kept}). Free disk "
                f"space or fix the permissions of {path.parent}, then resume with "
                "ckpt_path=last."
            ) from err


class StepCheckpoint(ModelCheckpoint):
    """``step.ckpt``, rewritten during the epoch: every ``every_n_train_steps`` optimizer
    steps, or every ``minutes`` of training when that is null.

    Saving is held back when it would cost more than a tenth of the training time (a
    ``freeze=all`` gpt2-xl checkpoint is 18 GB): the interval then grows to ten times the
    last save's duration.
    """

    def __init__(
        self,
        dirpath: str,
        minutes: float | None = 1.0,
        every_n_train_steps: int | None = None,
        filename: str = "step",
    ) -> None:
        if every_n_train_steps is None and not minutes:
            raise ValueError(
                "callbacks.step_checkpoint needs minutes or every_n_train_steps "
                "(or set callbacks.step_checkpoint=null to turn it off)"
            )
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"callbacks.step_checkpoint.every_n_train_steps={every_n_train_steps}: "
                "give a positive number of steps"
            )
        interval = timedelta(minutes=minutes) if every_n_train_steps is None and minutes else None
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=None, save_top_k=1,
            enable_version_counter=False, every_n_train_steps=every_n_train_steps,
            train_time_interval=interval, save_on_train_epoch_end=False,
        )  # fmt: skip
        self.minutes = minutes

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        # Not at the epoch's last batch: a checkpoint there (the batch not yet counted as
        # completed, the epoch's validation not yet run) resumed to other results, and
        # last.ckpt follows right after the validation.
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        if not mid_accumulation(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        start = time.monotonic()
        super()._save_checkpoint(trainer, filepath)
        took = time.monotonic() - start
        if self._train_time_interval is not None and self.minutes:
            wanted = max(60 * self.minutes, 10 * took)
            if wanted > self._train_time_interval.total_seconds() + 1:
                log.info("Step checkpoints every %.0f s: saving one took %.1f s", wanted, took)
            self._train_time_interval = timedelta(seconds=wanted)


# ----------------------------------------------------------------------------- resuming


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # Plain values: checkpoints are read with weights_only=True.
        "numpy": [
            v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()
        ],  # fmt: skip
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuple(states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


class ResumeState(L.Callback):
    """Adds to every checkpoint what Lightning leaves out and an exact resume needs: the
    random generators' states (dropout masks, the next epochs' shuffles) and how many
    epochs were complete when it was written."""

    def __init__(self) -> None:
        self.epoch_complete = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_complete = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the epoch's checkpoints: Lightning calls checkpoint callbacks last.
        self.epoch_complete = True
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            if hasattr(loader, "end_epoch"):  # data.batching.ResumableLoader
                loader.end_epoch()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_states"] = _rng_states()
        checkpoint["epochs_done"] = trainer.current_epoch + int(self.epoch_complete)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING and "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])


class GracefulStop(L.Callback):
    """SIGINT (Ctrl-C), SIGTERM or SIGUSR2 during training: finish the optimizer step,
    write ``interrupted.ckpt`` beside the other checkpoints and raise
    :class:`TrainingInterrupted`.

    SIGUSR2 is what SLURM sends ahead of a time limit or preemption when jobs are
    submitted through submitit (``--signal=USR2@signal_delay_s``); submitit's own handler
    (requeue the job) is handed on in the exception, to run after the checkpoint.
    A second Ctrl-C stops at once, without a checkpoint. Lightning's own SIGTERM handler
    still runs (it stops DDP's child processes); its flag is honoured the same way.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, *PREEMPTION_SIGNALS)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = signum
        log.warning(
            "%s received: stopping after this training step, with a checkpoint%s",
            signal.Signals(signum).name,
            " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else "",
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        asked = self.signum is not None or trainer.received_sigterm
        # Every rank stops at the same step when any of them was signalled.
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):
            return
        if mid_accumulation(trainer):
            return  # the accumulated gradients would be lost; stop after the step
        signum = self.signum or signal.SIGTERM
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(dirpath or trainer.default_root_dir) / INTERRUPTED_CHECKPOINT
        trainer.save_checkpoint(path)
        then = self._previous.get(signum) if signum in PREEMPTION_SIGNALS else None
        raise TrainingInterrupted(signum, path, then)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


def find_checkpoint(where: Path) -> Path:
    """The checkpoint to resume from: ``where`` itself when it is a file, else the one of
    ``where`` (a run folder or its ``checkpoints/``) that trained furthest."""
    if where.is_file():
        return where
    folder = where / "checkpoints" if (where / "checkpoints").is_dir() else where
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no checkpoint (*.ckpt) in {folder}: to resume a run, point hydra.run.dir at its "
            "folder (the one holding checkpoints/), or give ckpt_path=<a .ckpt file>."
        )
    # Ties (a best checkpoint and last.ckpt linked to it are one file) go to last.ckpt.
    return max(found, key=lambda p: (checkpoint_header(p)["global_step"], p.stat().st_mtime,
                                     p.name == "last.ckpt"))  # fmt: skip


def checkpoint_header(path: Path) -> dict[str, Any]:
    """A checkpoint's progress fields, read without loading its tensors (of a sharded
    checkpoint folder: from its metadata file, beside the shards)."""
    try:
        stored = torch.load(settings_file(Path(path)), map_location="cpu", weights_only=True,
                            mmap=True)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RuntimeError(f"{path} is not a readable checkpoint ({err})") from err
    return {"global_step": int(stored.get("global_step", 0)),
            "epoch": int(stored.get("epoch", 0)),
            "epochs_done": stored.get("epochs_done"),
            "batches_that_stepped": _batches_that_stepped(stored)}  # fmt: skip


def _batches_that_stepped(stored: dict[str, Any]) -> int:
    """The step Lightning's loggers were at (TensorBoard continues from it)."""
    loop = stored.get("loops", {}).get("fit_loop", {})
    return int(
        loop.get("epoch_loop.state_dict", {}).get(
            "_batches_that_stepped", stored.get("global_step", 0)
        )
    )

"""Survive crashes and signals: step checkpoints, safe saves, exact resume.

- :class:`RunCheckpoint` keeps the best checkpoints' record when a run continues into
  a new folder.
- :class:`StepCheckpoint` rewrites ``checkpoints/step.ckpt`` every minute of training
  (or every N optimizer steps), so a crash loses about a minute of work.
- :class:`AtomicCheckpointIO` writes every checkpoint through a unique temporary file
  and ``os.replace``: a full disk or a permission error leaves the previous one intact.
- :class:`ResumeState` puts the random generators' states and the completed epochs into
  each checkpoint, so a resumed run draws what the uninterrupted run would have drawn
  (the mid-epoch data order itself is kept by ``data.samplers.ResumableLoader``).

Signals (Ctrl-C, SIGTERM, SLURM's warning) are handled in :mod:`~gpt_classifier.training.signals`.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from gpt_classifier.files import atomic_path

log = logging.getLogger(__name__)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names it and what is left."""


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


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, which also keeps the run's record (the best
    checkpoints so far) when a run continues into a new folder (``ckpt_path=<run>`` with
    another ``hydra.run.dir``). Lightning's forgets it there, so the new folder's first
    checkpoint became the best however it compared, and the final evaluation could take
    a worse one than the uninterrupted run. The earlier folder's files stay: Lightning
    deletes only checkpoints inside its own ``dirpath``."""

    @property
    def state_key(self) -> str:
        # Lightning's own key, so that runs saved by plain ModelCheckpoint resume as before
        # (a subclass, StepCheckpoint, keeps its own).
        return super().state_key.replace("RunCheckpoint", "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:
            if self.monitor is not None:
                log.info("Continuing in a new folder: the best checkpoint so far is %s",
                         state_dict.get("best_model_path"))  # fmt: skip
            # last_model_path is this folder's own; the rest is the run's record.
            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "last_model_path": self.last_model_path}  # fmt: skip
        super().load_state_dict(state_dict)


class RunEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping``, whose patience on a resume is the config's: Lightning's
    restores the one it was saved with, so a resume's ``callbacks.early_stopping.patience``
    was ignored."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace("RunEarlyStopping", "EarlyStopping", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "patience": self.patience})


class StepCheckpoint(RunCheckpoint):
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
            if hasattr(loader, "end_epoch"):  # data.samplers.ResumableLoader
                loader.end_epoch()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume restores the optimizer with the values it was saved with; the config's
        # win, so that a resume's optimizer.lr=... applies (under a scheduler, whose state
        # sets them, the run's config refuses such a change).
        factory = getattr(pl_module, "optimizer_factory", None)
        if trainer.ckpt_path is None or trainer.lr_scheduler_configs or factory is None:
            return
        for group in (g for optimizer in trainer.optimizers for g in optimizer.param_groups):
            group.update({k: v for k, v in getattr(factory, "keywords", {}).items()
                          if k in group and group[k] != v})  # fmt: skip

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

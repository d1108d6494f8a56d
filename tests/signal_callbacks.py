"""A callback for the signal tests, built by train.py from ``+callbacks.<name>=...``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class SignalInValidation(L.Callback):
    """Sends this process ``signum`` (a name: SIGTERM, SIGINT) at the first batch of
    epoch ``epoch``'s validation, once: a signal that arrives outside a training step.
    ``marker`` records that it has (a resumed run reads the same config)."""

    def __init__(self, marker: str, signum: str = "SIGTERM", epoch: int = 0) -> None:
        self.marker, self.signum, self.epoch = Path(marker), signal.Signals[signum], epoch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking or batch_idx or trainer.current_epoch != self.epoch:
            return
        if self.marker.exists():
            return
        self.marker.write_text("sent\n")
        os.kill(os.getpid(), self.signum)


class SignalAtTrainStart(L.Callback):
    """Sends this process ``signum`` as training starts, before the frozen-prefix pass
    (configured callbacks run before train.py's own), once (``marker``)."""

    def __init__(self, marker: str, signum: str = "SIGTERM") -> None:
        self.marker, self.signum = Path(marker), signal.Signals[signum]

    def on_train_start(self, trainer, pl_module):
        if not self.marker.exists():
            self.marker.write_text("sent\n")
            os.kill(os.getpid(), self.signum)


class SignalAfterStepCallbacks(ModelCheckpoint):
    """Sends this process SIGTERM once, after optimizer step ``step``, from the last of the
    step's callbacks: Lightning runs checkpoint callbacks after all others, so the signal
    lands after GracefulStop has looked at this step. Saves nothing itself."""

    def __init__(self, marker: str, step: int) -> None:
        super().__init__(monitor=None, save_top_k=0)
        self.marker, self.step = Path(marker), step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text("sent\n")
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer, pl_module):
        pass

    def on_validation_end(self, trainer, pl_module):
        pass

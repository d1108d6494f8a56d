"""A callback for the signal tests, built by train.py from ``+callbacks.<name>=...``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class SigtermInValidation(L.Callback):
    """Sends this process SIGTERM at the first batch of a validation, once: a signal
    that arrives outside a training step. ``marker`` records that it has (a resumed run
    reads the same config)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking or batch_idx or self.marker.exists():
            return
        self.marker.write_text("sent\n")
        os.kill(os.getpid(), signal.SIGTERM)

"""How long a run takes to get going: process start (or job start) to the first step."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L

_FIRST_JOB = True  # the first job of a process also pays the interpreter and imports


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces; fields after ')' are fixed.
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


class StartupTimer(L.Callback):
    """Measures ``startup_s``: from the start of the process (for its first job; a
    sweep's later jobs from their own start) to the first training step, minus the
    seconds ``excluded()`` reports by then (the frozen-prefix pass)."""

    def __init__(self, excluded: Any = None) -> None:
        global _FIRST_JOB
        now = time.perf_counter()
        age = process_age() if _FIRST_JOB else None
        _FIRST_JOB = False
        self.start = now - (age or 0.0)
        self.excluded = excluded or (lambda: 0.0)
        self.seconds: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start - float(self.excluded())

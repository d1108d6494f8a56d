"""How long a run takes to get going: process start (or job start) to the first step."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L


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
    """Measures ``startup_s``: from the start of the process (``from_process_start``;
    else, as for a sweep's jobs, from this callback's creation) to the first training
    step, minus the seconds ``excluded()`` reports by then (the frozen-prefix pass)."""

    def __init__(self, excluded: Any = None, from_process_start: bool = True) -> None:
        age = process_age() if from_process_start else None
        self.start = time.perf_counter() - (age or 0.0)
        self.excluded = excluded or (lambda: 0.0)
        self.seconds: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start - float(self.excluded())

"""The book's training curves: loss and accuracy per epoch, examples seen on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

CURVE_METRICS = ("train/loss", "val/loss", "train/acc", "val/acc")


class TrainingCurves(L.Callback):
    """Records train and validation loss and accuracy per epoch and, after fitting,
    writes ``loss-plot.png`` and ``accuracy-plot.png`` into ``dirpath``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.history: dict[int, dict[str, float]] = {}
        self.examples_seen = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        # Every process trains on as many examples as this one (data.datamodule).
        self.examples_seen += len(batch["labels"]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation has run by now; the epoch's metrics are in callback_metrics.
        metrics = trainer.callback_metrics
        row = {k: float(metrics[k]) for k in CURVE_METRICS if k in metrics}
        # A module that keeps its own epoch metrics logs them after the callbacks run.
        epoch_values = getattr(pl_module, "epoch_values", None)
        if callable(epoch_values):
            row.update(epoch_values("train"))
        row["examples_seen"] = self.examples_seen
        self.history[trainer.current_epoch + 1] = row

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = [(e, r) for e, r in sorted(self.history.items()) if set(CURVE_METRICS) <= set(r)]
        if not rows or not trainer.is_global_zero:
            return
        from gpt_classifier.reporting.plots import plot_curves  # matplotlib: only when needed

        epochs = [epoch for epoch, _ in rows]
        seen = [int(r["examples_seen"]) for _, r in rows]
        for key, name in (("loss", "loss"), ("acc", "accuracy")):
            train = [r[f"train/{key}"] for _, r in rows]
            val = [r[f"val/{key}"] for _, r in rows]
            plot_curves(epochs, seen, train, val, name, self.dirpath / f"{name}-plot.png")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "examples_seen": self.examples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): v for k, v in state_dict.get("history", {}).items()}
        self.examples_seen = int(state_dict.get("examples_seen", 0))

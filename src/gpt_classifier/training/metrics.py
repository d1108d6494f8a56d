"""``SplitMetrics``: the metrics of one split, accumulated over its batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


class SplitMetrics(nn.Module):
    """Accuracy, mean loss, precision/recall/F1 and the number of examples of one split.

    Precision, recall and F1 are the positive class's for two classes (spam, by
    default), macro averages otherwise.
    """

    def __init__(self, num_classes: int, positive_class: int = 1) -> None:
        super().__init__()
        self.positive_class = positive_class
        self.binary = num_classes == 2
        # Predictions are argmaxes and labels passed cross-entropy's bounds check first:
        # torchmetrics' own checks (torch.unique per update) would only cost time.
        check = {"validate_args": False}
        self.acc = MulticlassAccuracy(num_classes, average="micro", **check)
        if self.binary:
            self.precision, self.recall, self.f1 = (
                BinaryPrecision(**check),
                BinaryRecall(**check),
                BinaryF1Score(**check),
            )
        else:
            self.precision = MulticlassPrecision(num_classes, average="macro", **check)
            self.recall = MulticlassRecall(num_classes, average="macro", **check)
            self.f1 = MulticlassF1Score(num_classes, average="macro", **check)
        self.loss = MeanMetric()

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        preds = logits.argmax(dim=-1)
        self.acc.update(preds, labels)
        if self.binary:
            preds, labels = (
                (preds == self.positive_class).long(),
                (labels == self.positive_class).long(),
            )
        for metric in (self.precision, self.recall, self.f1):
            metric.update(preds, labels)
        self.loss.update(loss.detach(), weight=len(labels))  # its weight counts the examples

    def reset(self) -> None:
        for metric in self.named().values():
            metric.reset()

    def named(self) -> dict[str, Metric]:
        return {"acc": self.acc, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "loss": self.loss}  # fmt: skip

    def examples(self) -> int:
        """How many examples all processes have updated these metrics with (the loss's
        weights), each counted once. Under data parallelism every process gets the same
        number: ``compute`` gathers from all of them, so a process with no examples of a
        small split must not skip it and hang the others."""
        count = self.loss.weight.detach().reshape(1).round().to(torch.int64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
        return int(count.item())

    def values(self, names: Iterable[str]) -> dict[str, float]:
        """The named metrics over everything updated so far, in every process (nothing
        is reset)."""
        if not self.examples():
            return {}
        return {name: float(self.named()[name].compute()) for name in names}

    def accumulated(self) -> dict[str, dict[str, Any]]:
        """What the metrics have accumulated, for a checkpoint taken mid-epoch."""
        return {
            name: {"states": {k: v.detach().clone() for k, v in metric.metric_state.items()},
                   "updates": metric._update_count}
            for name, metric in self.named().items()
        }  # fmt: skip

    def restore(self, accumulated: dict[str, dict[str, Any]]) -> None:
        """Continue from :meth:`accumulated`'s values."""
        for name, metric in self.named().items():
            if name not in accumulated:
                continue
            for key, value in accumulated[name]["states"].items():
                setattr(metric, key, value.to(metric.device))
            metric._update_count = int(accumulated[name]["updates"])

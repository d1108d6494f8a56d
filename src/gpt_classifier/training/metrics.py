"""Classification metrics of any number of classes, all from one confusion matrix.

``SplitMetrics`` accumulates a split's confusion matrix and mean loss over its batches;
``rates`` turns a confusion matrix into accuracy, precision, recall and F1 (per class,
macro and micro), computed as torchmetrics computes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassConfusionMatrix


def class_keys(names: Sequence[str]) -> list[str]:
    """A metric-name part per class: its label name, with ``/`` (which would nest the
    metric's name) as ``_``; made unique by the class index where that merges two."""
    keys = [str(name).replace("/", "_") for name in names]
    if len(set(keys)) < len(keys):
        keys = [f"{i}_{key}" for i, key in enumerate(keys)]
    return keys


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` in float32, 0 where ``den`` is 0 (torchmetrics' zero_division=0)."""
    num, den = num.float(), den.float()
    return torch.where(den == 0, torch.zeros_like(num), num / den.clamp_min(1e-38))


def rates(matrix: torch.Tensor, names: Sequence[str], positive_class: int = 1
          ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Accuracy, precision, recall and F1 of a confusion matrix (rows: true class,
    columns: predicted), as 0-d tensors.

    ``precision``/``recall``/``f1`` are the positive class's for two classes (spam, by
    default) and macro averages otherwise; ``f1_macro`` and ``f1_micro`` always are. A
    macro average leaves out the classes neither in the labels nor predicted, and a rate
    whose denominator is 0 is 0, both as in torchmetrics. ``class/<name>/...`` hold each
    class's precision, recall, F1 and support (its true examples).
    """
    matrix = matrix.to(torch.int64)
    tp = matrix.diagonal()
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    precision, recall = _divide(tp, tp + fp), _divide(tp, tp + fn)
    f1 = _divide(2.0 * tp, 2.0 * tp + fn + fp)
    seen = (tp + fp + fn != 0).float()

    def macro(score: torch.Tensor) -> torch.Tensor:
        return _divide(seen * score, seen.sum()).sum()

    out = {"acc": _divide(tp.sum(), matrix.sum())}
    if len(names) == 2:
        k = positive_class
        out |= {"precision": precision[k], "recall": recall[k], "f1": f1[k]}
    else:
        out |= {"precision": macro(precision), "recall": macro(recall), "f1": macro(f1)}
    out["f1_macro"] = macro(f1)
    out["f1_micro"] = _divide(2.0 * tp.sum(), 2.0 * tp.sum() + fn.sum() + fp.sum())
    for i, key in enumerate(class_keys(names)):
        out |= {f"class/{key}/precision": precision[i], f"class/{key}/recall": recall[i],
                f"class/{key}/f1": f1[i], f"class/{key}/support": (tp + fn)[i].float()}  # fmt: skip
    return out


def logged_names(names: Sequence[str]) -> list[str]:
    """What a split's metrics log for classes ``names``, without the split's prefix."""
    return [*rates(torch.zeros(len(names), len(names)), names), "loss", "examples"]


class SplitMetrics(nn.Module):
    """The confusion matrix and mean loss of one split, accumulated over its batches."""

    def __init__(self, label_names: Sequence[str], positive_class: int = 1) -> None:
        super().__init__()
        self.label_names = list(label_names)
        self.positive_class = positive_class
        # Predictions are argmaxes and labels passed cross-entropy's bounds check first:
        # torchmetrics' own checks (torch.unique per update) would only cost time.
        self.confusion = MulticlassConfusionMatrix(len(self.label_names), validate_args=False)
        self.loss = MeanMetric()

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        self.confusion.update(logits.argmax(dim=-1), labels)
        self.loss.update(loss.detach(), weight=len(labels))  # its weight counts the examples

    def reset(self) -> None:
        for metric in self.named().values():
            metric.reset()

    def named(self) -> dict[str, Metric]:
        return {"confusion": self.confusion, "loss": self.loss}

    def examples(self) -> int:
        """How many examples all processes have updated these metrics with (the loss's
        weights), each counted once. Under data parallelism every process gets the same
        number: ``compute`` gathers from all of them, so a process with no examples of a
        small split must not skip it and hang the others."""
        count = self.loss.weight.detach().reshape(1).round().to(torch.int64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
        return int(count.item())

    def matrix(self) -> torch.Tensor:
        """The confusion matrix over every process's examples so far."""
        return self.confusion.compute()

    def compute(self) -> dict[str, torch.Tensor]:
        """Every rate of :func:`rates` and the mean ``loss``, over every process's
        examples so far (nothing is reset)."""
        values = rates(self.matrix(), self.label_names, self.positive_class)
        return values | {"loss": self.loss.compute()}

    def values(self, names: Iterable[str]) -> dict[str, float]:
        """The named values of :meth:`compute` as floats ({} before any example)."""
        if not self.examples():
            return {}
        computed = self.compute()
        return {name: float(computed[name]) for name in names}

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

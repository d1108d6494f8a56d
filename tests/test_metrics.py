"""Metrics of any number of classes from one confusion matrix, as torchmetrics gives them."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import multiclass_confusion_matrix

from gpt_classifier.training.metrics import SplitMetrics, class_keys, logged_names, rates


def torchmetrics_values(preds: torch.Tensor, target: torch.Tensor, n: int) -> dict[str, float]:
    if n == 2:  # the positive class (1)
        p, t = (preds == 1).long(), (target == 1).long()
        out = {"precision": BinaryPrecision()(p, t), "recall": BinaryRecall()(p, t),
               "f1": BinaryF1Score()(p, t)}  # fmt: skip
    else:
        out = {"precision": MulticlassPrecision(n, average="macro")(preds, target),
               "recall": MulticlassRecall(n, average="macro")(preds, target),
               "f1": MulticlassF1Score(n, average="macro")(preds, target)}  # fmt: skip
    out["acc"] = MulticlassAccuracy(n, average="micro")(preds, target)
    out["f1_macro"] = MulticlassF1Score(n, average="macro")(preds, target)
    out["f1_micro"] = MulticlassF1Score(n, average="micro")(preds, target)
    for kind, cls in (("precision", MulticlassPrecision), ("recall", MulticlassRecall),
                      ("f1", MulticlassF1Score)):  # fmt: skip
        per_class = cls(n, average=None)(preds, target)
        out |= {f"class/{i}/{kind}": per_class[i] for i in range(n)}
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize("n", [2, 3, 5])
def test_rates_equal_torchmetrics_exactly_also_with_absent_classes(n):
    generator = torch.Generator().manual_seed(n)
    for trial in range(40):
        size = int(torch.randint(1, 300, (1,), generator=generator))
        target = torch.randint(0, n, (size,), generator=generator)
        preds = torch.randint(0, n, (size,), generator=generator)
        if trial % 4 == 0:
            preds[:] = 0  # classes never predicted
        if trial % 4 == 1:
            target[:] = n - 1  # classes not in the labels (left out of macro averages)
        matrix = multiclass_confusion_matrix(preds, target, n)
        ours = {k: float(v) for k, v in rates(matrix, [str(i) for i in range(n)]).items()}
        for key, value in torchmetrics_values(preds, target, n).items():
            assert ours[key] == value, (trial, key)  # bit for bit, not approximately
        assert [ours[f"class/{i}/support"] for i in range(n)] == target.bincount(
            minlength=n).tolist()  # fmt: skip


def test_split_metrics_accumulate_batches_and_restore_mid_epoch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(90, 3, generator=generator)
    labels = torch.randint(0, 3, (90,), generator=generator)
    whole, resumed = SplitMetrics(["a", "b", "c"]), SplitMetrics(["a", "b", "c"])
    for start in range(0, 90, 30):
        whole.update(logits[start : start + 30], labels[start : start + 30], torch.tensor(1.0))
        if start == 30:
            resumed.restore(whole.accumulated())
    resumed.update(logits[60:], labels[60:], torch.tensor(1.0))
    assert whole.examples() == resumed.examples() == 90
    for key, value in whole.compute().items():
        assert float(resumed.compute()[key]) == float(value), key
    expected = multiclass_confusion_matrix(logits.argmax(1), labels, 3)
    assert torch.equal(whole.matrix(), expected)
    # What a monitored metric is checked against (the module logs examples beside these).
    assert logged_names(["a", "b", "c"]) == [*whole.compute(), "examples"]


def test_class_keys_never_nest_or_merge_metric_names():
    assert class_keys(["World", "Sci/Tech"]) == ["World", "Sci_Tech"]
    assert class_keys(["a/b", "a_b"]) == ["0_a_b", "1_a_b"]


@pytest.mark.parametrize("n", [2, 60, 1000])
def test_a_confusion_matrix_picture_stays_one_screen_whatever_the_classes(n):
    """Drawn at 0.4 inch a class, 400 classes took 9 GB and 38 s a picture at the end of a
    run, and the memory grows with the area (1000 classes: about 57 GB)."""
    from gpt_classifier.reporting.plots import confusion_figure, plt

    labels = [f"class_{i}" for i in range(n)]
    figure = confusion_figure([[i == j for j in range(n)] for i in range(n)], labels)
    named = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    plt.close(figure)
    assert max(figure.get_size_inches()) <= 26
    assert named == labels if n <= 60 else (len(named) <= 60 and named[0] == "class_0")

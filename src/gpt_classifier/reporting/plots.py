"""Pictures of a run: training curves like the book's, and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_curves(
    epochs: Sequence[int],
    examples_seen: Sequence[int],
    train: Sequence[float],
    val: Sequence[float],
    name: str,
    path: Path,
) -> Path:
    """One metric over epochs (train and validation), examples seen on a second axis."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(epochs, train, marker="o", label=f"Training {name}")
    ax.plot(epochs, val, marker="o", linestyle="-.", label=f"Validation {name}")
    ax.set_xlabel("Epochs")
    ax.set_ylabel(name.capitalize())
    ax.legend()
    top = ax.twiny()  # the book's second x axis: examples seen
    top.plot(examples_seen, train, alpha=0)
    top.set_xlabel("Examples seen")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_figure(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> Figure:
    """A labelled confusion matrix (rows: true label, columns: predicted), sized for the
    number of classes up to 60, each class named (beyond, every k-th); the counts are
    written in the cells up to 30 classes."""
    n = len(labels)
    # Grown past 60 classes, the picture's memory and drawing time grow with its area:
    # hundreds of classes took gigabytes and minutes at the end of a run.
    side = min(max(3.5, 0.4 * n + 2), 0.4 * 60 + 2)
    fig, ax = plt.subplots(figsize=(side, side * 0.86))
    image = ax.imshow(matrix, cmap="Blues")
    named = range(0, n, -(-n // 60))
    ax.set_xticks(named, [labels[i] for i in named], rotation=90 if n > 4 else 0)
    ax.set_yticks(named, [labels[i] for i in named])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix if n <= 30 else []):
        for j, count in enumerate(row):
            color = "white" if count > peak / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def save_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str],
                          path: Path) -> Figure:  # fmt: skip
    """Draw :func:`confusion_figure` into ``path`` (PNG) and return the figure."""
    figure = confusion_figure(matrix, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return figure

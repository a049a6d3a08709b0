"""Figures as pure functions: values in, a matplotlib Figure out (saving is the caller's job)."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from pipeline.core.data import INPUT_SHAPE


def use_file_backend() -> None:
    """Draw with Agg: figures are files, never windows (call once, before the first figure)."""
    matplotlib.use("Agg")


def accuracy_limits(history: list[dict[str, float]]) -> tuple[float, float]:
    """A y-range for accuracies that shows where curves differ: from the lowest value after the first
    epoch (which is usually far below the rest) to the highest, padded, at most 1."""
    rows = history[1:] or history
    shown = [row[key] for row in rows for key in ("accuracy", "val_accuracy")]
    low, high = min(shown), max(shown)
    pad = max((high - low) * 0.08, 0.0005)
    return max(low - pad, 0.0), min(high + pad, 1.0)


def training_curves(history: list[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch, training and validation side by side; the accuracy axis is zoomed
    to the epochs after the first, where runs differ."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        loss_axis.plot(epochs, [row[key] for row in history], style, marker="o", label=key)
    for key, style in (("accuracy", "-"), ("val_accuracy", "--")):
        accuracy_axis.plot(epochs, [row[key] for row in history], style, marker="o", label=key)
    loss_axis.set(title="Loss", xlabel="epoch", yscale="log")
    accuracy_axis.set(title="Accuracy (zoomed; epoch 1 may lie below)" if len(history) > 1 else "Accuracy",
                      xlabel="epoch")
    accuracy_axis.set_ylim(*accuracy_limits(history))
    best = max(history, key=lambda row: row["val_accuracy"])
    figure.suptitle(f"Training curves: best val_accuracy {best['val_accuracy']:.4f} at epoch {int(best['epoch'])}")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
        axis.xaxis.get_major_locator().set_params(integer=True)
    return figure


def confusion_heatmap(matrix: np.ndarray, title: str = "Confusion matrix (test)") -> Figure:
    """Counts per (actual, predicted) cell, diagonal included, with a log-ish colour scale."""
    figure, axis = plt.subplots(figsize=(7, 6), constrained_layout=True)
    shown = np.log1p(matrix)
    image = axis.imshow(shown, cmap="Blues")
    threshold = shown.max() / 2
    for actual in range(matrix.shape[0]):
        for predicted in range(matrix.shape[1]):
            count = int(matrix[actual, predicted])
            if count:
                colour = "white" if shown[actual, predicted] > threshold else "black"
                axis.text(predicted, actual, str(count), ha="center", va="center", fontsize=8, color=colour)
    axis.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="actual", title=title)
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    return figure


def digit_grid(images: np.ndarray, captions: list[str], title: str, columns: int = 6) -> Figure:
    """A grid of 28x28 digits with a caption under each (e.g. 'true 4 / pred 9 (0.87)')."""
    count = max(len(images), 1)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions):
        axis.imshow(image.reshape(INPUT_SHAPE[:2]), cmap="gray_r", vmin=0, vmax=255)
        axis.set_title(caption, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def save(figure: Figure, path) -> None:
    figure.savefig(path, dpi=110)
    plt.close(figure)

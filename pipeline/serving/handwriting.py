"""The handwriting set's score: how a model reads pictures of digits it never trained on.

The pictures (`paths.handwriting_set`, made by `tools/handwriting.py`) go through the same
preparation as users' images (`pipeline.serving.images`), so the score is the real-world figure.
`evaluate` writes it as a DVC metric (`paths.handwriting`) and a figure.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.data import IMAGE_SIDE
from pipeline.core.errors import PipelineError
from pipeline.serving.images import ImageError, prepare_image, read_image
from pipeline.serving.predict import predict_files

LABELS_FILE = "labels.csv"
UNREADABLE = -1  # the prediction of a picture that could not be read


def read_labels(folder: Path) -> list[dict[str, str]]:
    path = folder / LABELS_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found; set paths.handwriting_set to a folder with labels.csv "
                            "(`python -m tools.handwriting --out FOLDER` makes one)")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def accuracy_by(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Accuracy within each value of `key` (e.g. source, polarity, label)."""
    totals, right = Counter(), Counter()
    for row in rows:
        totals[str(row[key])] += 1
        right[str(row[key])] += int(row["correct"])
    return {group: right[group] / totals[group] for group in sorted(totals)}


def prepared_pixels(folder: str | Path) -> tuple[np.ndarray, int]:
    """The set's pictures as the serving path prepares them (n, 28, 28), and how many there are in
    all (a picture that cannot be prepared is left out of the first, counted in the second)."""
    folder = Path(folder)
    labels = read_labels(folder)
    pixels = []
    for row in labels:
        try:
            pixels.append(prepare_image(read_image(folder / row["file"])))
        except ImageError:
            pass
    return (np.stack(pixels) if pixels else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.float32)), len(labels)


def predict_folder(model: Any, folder: str | Path) -> list[dict[str, Any]]:
    """Each row of `folder`'s labels.csv with the model's answer: predicted (-1: unreadable),
    confidence and correct. Predicted once; `score` and `prediction_sheet` read these rows."""
    folder = Path(folder)
    labels = read_labels(folder)
    results = predict_files(model, [folder / row["file"] for row in labels])
    rows = []
    for row, result in zip(labels, results):
        predicted = result.get("label", UNREADABLE)
        rows.append({**row, "predicted": predicted, "confidence": result.get("confidence", 0.0),
                     "correct": predicted == int(row["label"])})
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of `predict_folder`'s rows, overall and per source/polarity/label; an unreadable
    picture counts as wrong. Returns {accuracy, count, by_source, by_polarity, by_label,
    wrong: [{file, label, predicted, confidence, source}]}."""
    correct = sum(row["correct"] for row in rows)
    return {
        "accuracy": correct / len(rows) if rows else 0.0,
        "count": len(rows),
        "by_source": accuracy_by(rows, "source"),
        "by_polarity": accuracy_by(rows, "polarity"),
        "by_label": accuracy_by(rows, "label"),
        "wrong": [
            {key: row[key] for key in ("file", "label", "predicted", "confidence", "source")}
            for row in rows if not row["correct"]
        ],
    }


def score_folder(model: Any, folder: str | Path) -> dict[str, Any]:
    """`score` of a model on the pictures of `folder`."""
    return score(predict_folder(model, folder))


def sample(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Every len/count-th row, at most `count`: the files cycle through the digits, so the step
    shares no factor with 10 (else it would skip some digits)."""
    step = max(1, len(rows) // count)
    while math.gcd(step, 10) != 1:
        step += 1
    return rows[::step][:count]


def prediction_sheet(rows: list[dict[str, Any]], folder: str | Path, count: int = 24, columns: int = 8):
    """A figure of sample pictures (`sample`) of `predict_folder`'s rows with the label each was
    predicted as (draw with a backend chosen first: `plots.use_file_backend`)."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    picked = sample(rows, count)
    grid_rows = -(-len(picked) // columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(columns * 1.5, grid_rows * 1.75), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row in zip(axes.flat, picked):
        with Image.open(folder / row["file"]) as image:
            axis.imshow(image.convert("RGB"))
        right = row["correct"]
        answer = "unreadable" if row["predicted"] == UNREADABLE else f"{row['predicted']} ({row['confidence']:.2f})"
        caption = f"true {row['label']} → {answer}" + ("" if right else "  ✗")
        axis.set_title(caption, fontsize=8, color="black" if right else "red", fontweight="normal" if right else "bold")
        if not right:
            for spine in axis.spines.values():
                spine.set(visible=True, color="red", linewidth=2)
            axis.axis("on")
            axis.set(xticks=[], yticks=[])
    figure.suptitle("Pictures the model never trained on: true label → prediction (red ✗: wrong)")
    figure.tight_layout()
    return figure

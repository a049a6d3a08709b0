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

from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.serving.predict import predict_files

LABELS_FILE = "labels.csv"


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


def score_folder(model: Any, folder: str | Path) -> dict[str, Any]:
    """Accuracy of a model on the pictures of `folder`, overall and per source/polarity/label.

    An unreadable picture counts as wrong. Returns {accuracy, count, by_source, by_polarity,
    by_label, wrong: [{file, label, predicted, confidence}]}.
    """
    folder = Path(folder)
    labels = read_labels(folder)
    results = predict_files(model, [folder / row["file"] for row in labels])
    rows = []
    for row, result in zip(labels, results):
        predicted = result.get("label", -1)
        rows.append({**row, "predicted": predicted, "confidence": result.get("confidence", 0.0),
                     "correct": predicted == int(row["label"])})
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


def prediction_sheet(model: Any, folder: str | Path, count: int = 24, columns: int = 8):
    """A figure of sample pictures (every len/count-th file) with the label each was predicted as."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    labels = read_labels(folder)
    step = max(1, len(labels) // count)
    while math.gcd(step, 10) != 1:  # the files cycle through the digits: a step sharing a factor skips some
        step += 1
    picked = labels[::step][:count]
    results = predict_files(model, [folder / row["file"] for row in picked])
    rows = -(-len(picked) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 1.75), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row, result in zip(axes.flat, picked, results):
        with Image.open(folder / row["file"]) as image:
            axis.imshow(image.convert("RGB"))
        right = result.get("label") == int(row["label"])
        answer = f"{result['label']} ({result['confidence']:.2f})" if "label" in result else "unreadable"
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

"""Scoring a model on labelled digits: accuracy, loss, per-class scores, the confusion matrix.

Pure functions of labels and probabilities, plus the two adapters that load and run a model;
`evaluate` and the registry's re-scoring of a champion share them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sklearn import metrics

from pipeline.core.data import Split
from pipeline.core.errors import PipelineError
from pipeline.core.data import NUM_CLASSES

CLASSES = range(NUM_CLASSES)


LOSS_FLOOR = 1e-7  # probabilities are clipped here before the log (Keras' epsilon, as in training)


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts: rows are actual labels, columns predicted ones."""
    return metrics.confusion_matrix(y_true, y_pred, labels=CLASSES)


def log_loss(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    with warnings.catch_warnings():  # float32 softmax rows sum to 1 within ~1e-7, looser than sklearn's check
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        return float(metrics.log_loss(y_true, np.clip(probabilities, LOSS_FLOOR, 1.0), labels=CLASSES))


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, loss, macro and per-class precision/recall/F1 from predicted probabilities; a class
    never predicted (or never present) scores 0."""
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=CLASSES, average=None, zero_division=0.0)
    correct = int((y_pred == y_true).sum())
    return {
        "accuracy": correct / max(len(y_true), 1),
        "loss": log_loss(y_true, probabilities),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "errors": len(y_true) - correct,
        "per_class": {
            str(digit): {"precision": float(precision[digit]), "recall": float(recall[digit]), "f1": float(f1[digit])}
            for digit in CLASSES
        },
    }


def worst_mistakes(y_true: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of misclassified items, most confident mistakes first."""
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confidence = probabilities[wrong, y_pred[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def load_keras_model(path: Path):
    import keras

    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro train` first")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        raise PipelineError(f"{path} cannot be loaded ({type(error).__name__}); re-create it with `dvc repro -f train`") from None


def predict_probabilities(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    from pipeline.core.data import as_model_input

    return np.asarray(model.predict(as_model_input(x), batch_size=batch_size, verbose=0), dtype=np.float64)


def make_scorer(test: Split, batch_size: int):
    """score(model_uri) -> test accuracy of a registered model on this test split (re-scoring a champion),
    its Keras file hash-checked first."""

    def score(uri: str) -> float:
        from pipeline.serving.classifier import load_registered_keras

        model = load_registered_keras(uri)
        return classification_metrics(test.y, predict_probabilities(model, test.x, batch_size))["accuracy"]

    return score


def flat_metrics(metrics: dict, prefix: str = "test") -> dict[str, float]:
    """The summary scores as MLflow metrics (`test_accuracy`, ...); per-class ones go in `per_class_table`."""
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k != "per_class"}


def per_class_table(metrics: dict) -> dict[str, list]:
    """Per-class scores as columns digit, precision, recall, f1: one row per digit (an MLflow table)."""
    rows = sorted(metrics["per_class"].items(), key=lambda item: int(item[0]))
    return {"digit": [int(digit) for digit, _ in rows],
            **{name: [scores[name] for _, scores in rows] for name in ("precision", "recall", "f1")}}

"""`classification_metrics` (sklearn.metrics) against the hand-written definitions it replaced:
the same keys and the same values, on random cases with empty classes, certain and near-zero
probabilities."""

import numpy as np
import pytest

from pipeline.core.scoring import classification_metrics, confusion

CLASSES = 10
FLOOR = 1e-7  # the log-loss clip of the hand-written definition


def by_hand(y_true, probabilities):
    y_pred = probabilities.argmax(axis=1)
    matrix = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    hits, predicted, actual = np.diag(matrix).astype(np.float64), matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros(CLASSES), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros(CLASSES), where=actual > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(CLASSES), where=total > 0)
    picked = probabilities[np.arange(len(y_true)), y_true]
    return matrix, {
        "accuracy": float(hits.sum() / len(y_true)), "loss": float(-np.mean(np.log(np.clip(picked, FLOOR, 1.0)))),
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()), "errors": int(len(y_true) - hits.sum()),
        "per_class": {str(d): {"precision": float(precision[d]), "recall": float(recall[d]), "f1": float(f1[d])}
                      for d in range(CLASSES)},
    }


def random_case(seed: int, count: int = 200):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, CLASSES - 2, count)  # digits 8 and 9 never occur: zero_division paths
    logits = rng.normal(scale=6, size=(count, CLASSES)).astype(np.float32)
    logits[: count // 4, 9] = 60  # some confident mistakes, true-class probability below the floor
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)
    return y_true, probabilities.astype(np.float64)


@pytest.mark.parametrize("seed", range(5))
def test_sklearn_scores_equal_the_hand_written_ones(seed):
    y_true, probabilities = random_case(seed)
    matrix, expected = by_hand(y_true, probabilities)
    actual = classification_metrics(y_true, probabilities)
    assert list(actual) == list(expected) and list(actual["per_class"]) == list(expected["per_class"])
    np.testing.assert_array_equal(confusion(y_true, probabilities.argmax(axis=1)), matrix)
    for key in ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    assert actual["errors"] == expected["errors"]
    for digit, scores in expected["per_class"].items():
        assert actual["per_class"][digit] == pytest.approx(scores, rel=1e-12, abs=1e-15), digit

import numpy as np
import pytest

from pipeline.core.scoring import (
    classification_metrics,
    confusion,
    flat_metrics,
    log_loss,
    per_class_table,
    worst_mistakes,
)


def one_hot_probabilities(labels, confidence=0.9):
    probabilities = np.full((len(labels), 10), (1 - confidence) / 9)
    probabilities[np.arange(len(labels)), labels] = confidence
    return probabilities


def test_confusion_counts_rows_actual_columns_predicted():
    matrix = confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]))
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1 and matrix[1, 1] == 1 and matrix[2, 2] == 1
    assert matrix.sum() == 4


def test_metrics_on_a_known_case():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9])
    y_pred = y_true.copy()
    y_pred[0] = 1  # one 0 predicted as 1
    metrics = classification_metrics(y_true, one_hot_probabilities(y_pred))
    assert metrics["accuracy"] == pytest.approx(19 / 20)
    assert metrics["errors"] == 1
    assert metrics["per_class"]["0"]["recall"] == pytest.approx(0.5)
    assert metrics["per_class"]["1"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["5"]["f1"] == pytest.approx(1.0)
    expected_macro_f1 = (2 * 1 * 0.5 / 1.5 + 2 * (2 / 3) * 1 / (5 / 3) + 8) / 10
    assert metrics["macro_f1"] == pytest.approx(expected_macro_f1)
    flat = flat_metrics(metrics)
    assert flat["test_accuracy"] == pytest.approx(0.95) and flat["test_macro_f1"] == pytest.approx(expected_macro_f1)
    assert not any(key.endswith(tuple(f"_{digit}" for digit in range(10))) for key in flat)  # per class: one table


def test_per_class_table_has_one_row_per_digit_in_order():
    y_true = np.repeat(np.arange(10), 2)
    y_pred = y_true.copy()
    y_pred[0] = 1
    table = per_class_table(classification_metrics(y_true, one_hot_probabilities(y_pred)))
    assert list(table) == ["digit", "precision", "recall", "f1"]
    assert table["digit"] == list(range(10))
    assert table["recall"][0] == pytest.approx(0.5) and table["precision"][1] == pytest.approx(2 / 3)
    assert table["f1"][2:] == [1.0] * 8


def test_log_loss_matches_definition():
    y = np.array([0, 1])
    probabilities = one_hot_probabilities(y, confidence=0.5)
    assert log_loss(y, probabilities) == pytest.approx(-np.log(0.5))


def test_worst_mistakes_orders_by_confidence():
    y_true = np.array([0, 1, 2, 3])
    probabilities = one_hot_probabilities(np.array([0, 2, 3, 3]))
    probabilities[2] = one_hot_probabilities(np.array([3]), 0.99)[0]
    assert worst_mistakes(y_true, probabilities, 5).tolist() == [2, 1]

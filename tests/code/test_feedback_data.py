"""Users' feedback as data: the export's file, the stable split, and how preprocess adds it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.data import Split
from pipeline.core.errors import PipelineError
from pipeline.monitoring import feedback
from pipeline.monitoring.drift import NOT_A_DIGIT
from pipeline.monitoring.feedback import FEEDBACK_FILE, FeedbackSet
from pipeline.preprocess import with_feedback


def users(count: int, seed: int = 0) -> FeedbackSet:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 11, size=count)
    ids = np.array([f"{index:032x}-0" for index in range(seed * 10_000, seed * 10_000 + count)])
    return FeedbackSet(x, y, ids)


def test_the_export_file_is_the_same_bytes_for_the_same_feedback(tmp_path):
    given = users(30)
    feedback.save(given, tmp_path / "a.npz")
    feedback.save(given, tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    (tmp_path / "folder").mkdir()
    feedback.save(given, tmp_path / "folder" / FEEDBACK_FILE)
    loaded = feedback.load(tmp_path / "folder")
    assert np.array_equal(loaded.x, given.x) and np.array_equal(loaded.y, given.y) and list(loaded.ids) == list(given.ids)


def test_rows_become_a_set_in_id_order_and_rows_without_pixels_are_counted(tmp_path):
    pixels = [np.full((28, 28), value, np.uint8).tobytes() for value in (1, 2, 3)]
    rows = pd.DataFrame({"id": ["c-0", "a-0", "b-0", "d-0"], "pixels": [pixels[0], pixels[1], None, pixels[2]],
                         "feedback": [7, NOT_A_DIGIT, 3, -1]})
    labelled, without_pixels = feedback.from_rows(rows)
    assert list(labelled.ids) == ["a-0", "c-0"] and list(labelled.y) == [NOT_A_DIGIT, 7] and without_pixels == 1
    assert labelled.x[0, 0, 0] == 2


def test_a_picture_keeps_its_side_of_the_split_as_feedback_grows():
    first = users(200)
    more = FeedbackSet(*(np.concatenate([a, b]) for a, b in zip((first.x, first.y, first.ids),
                                                                 (users(300, seed=1).x, users(300, seed=1).y,
                                                                  users(300, seed=1).ids))))
    _, holdout_then = feedback.split(first, 0.3)
    _, holdout_now = feedback.split(more, 0.3)
    assert set(holdout_then.ids) == set(holdout_now.ids) & set(first.ids)
    assert 0.2 < len(holdout_now) / len(more) < 0.4


def test_no_feedback_is_an_empty_set_but_a_tracked_file_that_is_missing_is_an_error(tmp_path):
    assert len(feedback.load(tmp_path)) == 0
    (tmp_path / f"{FEEDBACK_FILE}.dvc").write_text("outs: []\n")
    with pytest.raises(PipelineError, match="dvc pull"):
        feedback.load(tmp_path)


def test_a_damaged_feedback_file_names_the_fix(tmp_path):
    (tmp_path / FEEDBACK_FILE).write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="feedback export"):
        feedback.load(tmp_path)


def test_preprocess_adds_the_training_digits_only_and_never_a_test_picture():
    rng = np.random.default_rng(3)
    train = Split(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50).astype(np.uint8))
    test = Split(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20).astype(np.uint8))
    given = users(100)
    given.x[5] = test.x[7]  # a user sent a test picture
    splits, (train_part, holdout_part) = with_feedback({"train": train, "val": train, "test": test}, given, 0.3)
    assert given.ids[5] not in set(train_part.ids) | set(holdout_part.ids)
    assert len(train_part) + len(holdout_part) == 99
    assert len(splits["train"]) == len(train) + len(train_part.digits)
    assert splits["train"].y.max() <= 9 and splits["test"] is test
    assert np.array_equal(splits["train"].x[len(train):], train_part.digits.x)


def test_holdout_accuracy_needs_the_verdict_for_a_not_a_digit():
    labels = np.array([3, 5, NOT_A_DIGIT, NOT_A_DIGIT])
    predicted = np.array([3, 4, 1, 1])
    assert feedback.holdout_accuracy(labels, predicted, np.array([True, True, False, True])) == 0.5
    assert feedback.holdout_accuracy(labels, predicted, None) == 0.25
    assert np.isnan(feedback.holdout_accuracy(labels[:0], predicted[:0], None))

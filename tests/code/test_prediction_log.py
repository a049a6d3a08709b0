"""The prediction log on a real SQLite file: rows as answered, features, the queue bound, feedback, the row cap."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from pipeline.monitoring import log as prediction_log
from pipeline.monitoring.features import FEATURES, input_features
from pipeline.monitoring.log import NOT_A_DIGIT, Entry, PredictionLog, UnknownPrediction, prediction_ids, read_rows


def entry(count: int = 3, version: str | None = "4", seed: int = 0, when: float | None = None) -> Entry:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((count, 28, 28), np.float32)
    for index in range(count):
        pixels[index, 6:22, 10 + index % 5:14 + index % 5] = 255.0  # a bar, moved a little each time
    probabilities = rng.dirichlet(np.ones(10), size=count).astype(np.float32)
    scores = rng.normal(size=count).astype(np.float32)
    scores[-1] = -np.inf  # a picture whose ink guard failed
    return Entry(time.time() if when is None else when, prediction_log.new_request_id(), "serve",
                 "models:/m@champion", version, pixels, probabilities, scores > 0, scores, 1.25)


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'scratch' / 'predictions.db'}"
    log = PredictionLog(url, store_pixels=True, max_rows=1000, queue_rows=100, flush_s=0.05).start()
    yield log
    log.stop()


def test_every_answered_picture_becomes_one_row_with_its_answer_and_features(store):
    given = entry(3)
    store.record(given)
    assert store.flush(5)
    rows = read_rows(store._connect())
    assert list(rows["id"]) == prediction_ids(given.request_id, 3)
    assert list(rows["label"]) == list(given.probabilities.argmax(axis=1))
    np.testing.assert_allclose(rows["confidence"], given.probabilities.max(axis=1), rtol=1e-6)
    assert list(rows["is_digit"]) == list(given.is_digit)
    assert rows["digit_score"].iloc[-1] is None or np.isnan(rows["digit_score"].iloc[-1])  # -inf is stored as null
    np.testing.assert_allclose(rows[list(FEATURES)].to_numpy(), input_features(given.pixels), rtol=1e-6)
    assert np.array_equal(np.frombuffer(rows["pixels"].iloc[1], np.uint8).reshape(28, 28), given.pixels[1])
    assert set(rows["version"]) == {"4"} and set(rows["interface"]) == {"serve"} and set(rows["feedback"]) == {-1}
    assert store.stats() == {"enabled": True, "written": 3, "dropped": 0, "queued": 0, "store": "up"}


def test_pixels_are_left_out_when_the_knob_says_so(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.db'}", store_pixels=False, max_rows=10, queue_rows=10).start()
    try:
        log.record(entry(2))
        assert log.flush(5)
        assert read_rows(log._connect())["pixels"].isna().all()
    finally:
        log.stop()


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.db'}", store_pixels=True, max_rows=1000, queue_rows=10)
    started = time.perf_counter()
    for seed in range(6):  # the writer is not started: 3 requests fit, 3 are dropped
        log.record(entry(3, seed=seed))
    assert time.perf_counter() - started < 0.5
    assert log.dropped == 9 and log._queued_rows == 9
    log.start()
    try:
        assert log.flush(5)
        assert log.stats()["written"] == 9 and len(read_rows(log._connect())) == 9
    finally:
        log.stop()


def test_feedback_keeps_the_last_label_and_refuses_unknown_ids(store):
    given = entry(2)
    store.record(given)
    first, second = prediction_ids(given.request_id, 2)
    store.save_feedback(first, 3)  # found after the queue is written, even if asked at once
    store.save_feedback(first, NOT_A_DIGIT)
    store.save_feedback(second, 7)
    rows = read_rows(store._connect())
    assert dict(zip(rows["id"], rows["feedback"])) == {first: NOT_A_DIGIT, second: 7}
    with pytest.raises(UnknownPrediction):
        store.save_feedback(f"{'0' * 32}-0", 1)


def test_the_row_cap_deletes_the_oldest_answers_but_keeps_labelled_ones(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.db'}", store_pixels=True, max_rows=6, queue_rows=100,
                        batch_rows=2, flush_s=0.05).start()
    try:
        oldest = entry(2, when=1000.0)
        log.record(oldest)
        assert log.flush(5)
        log.save_feedback(prediction_ids(oldest.request_id, 2)[0], 5)
        for step in range(5):
            log.record(entry(2, seed=step, when=2000.0 + step))
            assert log.flush(5)
        kept = read_rows(log._connect())
        assert len(kept) <= 6 + 1  # the cap, plus the labelled one it may not delete
        assert prediction_ids(oldest.request_id, 2)[0] in set(kept["id"])
        assert prediction_ids(oldest.request_id, 2)[1] not in set(kept["id"])
        assert kept["time"].max() == 2004.0
    finally:
        log.stop()


def test_a_dead_store_never_raises_into_record_and_says_so_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(prediction_log, "RECONNECT_S", 0.05)
    blocker = tmp_path / "scratch" / "not-a-folder"
    blocker.parent.mkdir()
    blocker.write_text("a file where the database's folder should be")
    log = PredictionLog(f"sqlite:///{blocker / 'p.db'}", store_pixels=True, max_rows=100, queue_rows=100,
                        flush_s=0.05).start()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.log"):
            for seed in range(5):
                log.record(entry(2, seed=seed))
                assert log.flush(5)
        assert log.stats()["dropped"] == 10 and log.stats()["store"] == "down" and log.written == 0
        assert caplog.text.count("unreachable") == 1  # one line when it goes down, not one per batch
    finally:
        log.stop()


@pytest.mark.parametrize("value, expected", [(0, 0), (9, 9), ("7", 7), ("not-digit", NOT_A_DIGIT), (" Not-Digit ", NOT_A_DIGIT)])
def test_feedback_labels(value, expected):
    assert prediction_log.parse_feedback_label(value) == expected


@pytest.mark.parametrize("value", [10, -1, True, 3.0, "x", "10", None, [1]])
def test_bad_feedback_labels_are_refused(value):
    with pytest.raises(ValueError, match="0-9 or \"not-digit\""):
        prediction_log.parse_feedback_label(value)

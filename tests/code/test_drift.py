"""The drift statistics on synthetic digit-like strokes: quiet on windows drawn like the reference,
loud on each kind of change, silent where data is missing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from pipeline.monitoring.drift import (NOT_A_DIGIT, DriftSettings, Sample, compare, correct_answers,
                                       format_p_value)
from pipeline.monitoring.features import FEATURES, input_features

SIDE = 28
GRID_Y, GRID_X = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
CLASS_SHARES = np.array([0.099, 0.112, 0.099, 0.102, 0.097, 0.090, 0.099, 0.104, 0.097, 0.101])  # MNIST's
REFERENCE_ROWS, WINDOW_ROWS = 3000, 300
FEATURE_CHECKS = {f"feature:{name}" for name in FEATURES}
ALL_CHECKS = 12  # 8 features, class mix, confidence, not-a-digit rate, feedback accuracy


def draw_strokes(rng: np.random.Generator, n: int, segments: int = 3) -> np.ndarray:
    """(n, 28, 28) uint8 pictures of a few thick, anti-aliased line segments around the centre."""
    centre = 13.5 + rng.normal(0, 1.0, (n, 1, 2))
    starts = (centre + rng.uniform(-7, 7, (n, segments, 2))).astype(np.float32)
    steps = (centre + rng.uniform(-7, 7, (n, segments, 2))).astype(np.float32) - starts
    half_width = rng.uniform(1.0, 1.8, (n, 1, 1)).astype(np.float32)
    nearest = np.full((n, SIDE, SIDE), np.inf, dtype=np.float32)
    for segment in range(segments):
        y0, x0, dy, dx = (values[:, None, None] for values in (starts[:, segment, 0], starts[:, segment, 1],
                                                               steps[:, segment, 0], steps[:, segment, 1]))
        rel_y, rel_x = GRID_Y - y0, GRID_X - x0
        along = np.clip((rel_y * dy + rel_x * dx) / np.maximum(dy * dy + dx * dx, 1e-6), 0, 1)
        nearest = np.minimum(nearest, np.hypot(rel_y - along * dy, rel_x - along * dx))
    return (255 * np.clip(half_width + 0.5 - nearest, 0, 1)).astype(np.uint8)


def thicker(pixels: np.ndarray) -> np.ndarray:
    """A wider pen: every stroke grows by a pixel on each side."""
    return ndimage.grey_dilation(pixels, size=(1, 3, 3))


def off_centre(pixels: np.ndarray, shift: int = 5) -> np.ndarray:
    """The pictures moved `shift` pixels right (what falls off the edge is lost)."""
    moved = np.zeros_like(pixels)
    moved[:, :, shift:] = pixels[:, :, :-shift]
    return moved


def answers(rng: np.random.Generator, pixels: np.ndarray, *, class_shares=CLASS_SHARES, confidence_beta=20.0,
            not_digit_rate=0.01, accuracy=0.99, feedback_share=0.2, verdict=True) -> Sample:
    """A Sample of model answers to `pixels`: confidence near 1 (mean 1 - 0.5/(0.5 + beta)), a share
    rejected as not digits, and true labels on `feedback_share` of the rows (right with `accuracy`)."""
    n = len(pixels)
    labels = rng.choice(len(class_shares), n, p=np.asarray(class_shares) / np.sum(class_shares))
    confidence = 1 - rng.beta(0.5, confidence_beta, n)
    is_digit = rng.random(n) >= not_digit_rate if verdict else None
    truth = np.where(rng.random(n) < accuracy, labels, (labels + rng.integers(1, 10, n)) % 10)
    true_labels = np.where(rng.random(n) < feedback_share, truth, -1) if feedback_share else None
    return Sample(input_features(pixels), labels, confidence, is_digit, true_labels)


def window(seed: int, n: int = WINDOW_ROWS, change=None, **answer_options) -> Sample:
    rng = np.random.default_rng(seed)
    pixels = draw_strokes(rng, n)
    return answers(rng, change(pixels) if change else pixels, **answer_options)


@pytest.fixture(scope="module")
def reference() -> Sample:
    """The validation split's stand-in: every row has its true label."""
    rng = np.random.default_rng(2024)
    return answers(rng, draw_strokes(rng, REFERENCE_ROWS), feedback_share=1.0)


def failed_names(report) -> set[str]:
    return {check.name for check in report.failed}


def check(report, name: str):
    return next(check for check in report.checks if check.name == name)


def test_windows_drawn_like_the_reference_raise_no_alarm(reference):
    reports = [compare(reference, window(seed)) for seed in range(100, 120)]
    assert all(len(report.ran) == ALL_CHECKS for report in reports)  # every check took part
    alarms = [sorted(failed_names(report)) for report in reports if report.status == "drift"]
    assert alarms == []  # fewer than 1 false alarm in 20 windows
    assert all(report.status == "ok" for report in reports)


def test_the_strokes_look_like_handwriting(reference):
    means = dict(zip(FEATURES, reference.features.mean(axis=0)))
    assert 0.05 < means["ink_fraction"] < 0.25 and 8 < means["bbox_height"] < 20
    assert abs(means["com_dx"]) < 0.5 and abs(means["com_dy"]) < 0.5


def test_a_thicker_pen_fails_ink_fraction(reference):
    report = compare(reference, window(1, change=thicker))
    assert report.status == "drift"
    assert "feature:ink_fraction" in failed_names(report)
    ink = check(report, "feature:ink_fraction")
    assert ink.window > ink.reference and ink.effect >= 0.1 and ink.p_value < 1e-10


def test_pictures_drawn_off_centre_fail_the_box_and_centre_of_mass(reference):
    failed = failed_names(compare(reference, window(2, change=off_centre)))
    assert {"feature:bbox_left", "feature:com_dx"} <= failed
    assert "feature:bbox_top" not in failed and "feature:com_dy" not in failed  # moved sideways only


def test_one_class_flooding_fails_only_the_class_mix(reference):
    flooded = np.full(10, 0.4 / 9)
    flooded[7] = 0.6
    report = compare(reference, window(3, class_shares=flooded))
    assert failed_names(report) == {"class_mix"}
    mix = check(report, "class_mix")
    assert mix.window > 0.5 and mix.reference < 0.15 and mix.effect > 0.4
    assert "class 7" in mix.detail


def test_a_class_absent_from_the_reference_or_from_both_is_handled(reference):
    no_nines = dataclasses.replace(reference, labels=np.where(reference.labels == 9, 8, reference.labels))
    shares = np.append(CLASS_SHARES[:8], [0.0, CLASS_SHARES[9]])  # the window never says 8, sometimes 9
    report = compare(no_nines, window(4, class_shares=shares))
    mix = check(report, "class_mix")
    assert np.isfinite(mix.statistic) and mix.passed is False  # 9 appears, 8 (a fifth of the reference) vanishes
    only_two = dataclasses.replace(reference, labels=reference.labels % 2)
    mix = check(compare(only_two, dataclasses.replace(window(5), labels=window(5).labels % 2)), "class_mix")
    assert np.isfinite(mix.statistic) and mix.passed is True  # classes 2-9 absent from both


def test_a_confidence_drop_fails_confidence_and_no_feature(reference):
    report = compare(reference, window(6, confidence_beta=3.0))
    assert "confidence" in failed_names(report)
    assert not failed_names(report) & FEATURE_CHECKS
    drop = check(report, "confidence")
    assert drop.reference - drop.window > 0.05


def test_a_small_significant_drop_in_a_big_window_does_not_alarm(reference):
    slightly_lower = dataclasses.replace(reference, confidence=reference.confidence - 0.01)
    confidence = check(compare(reference, slightly_lower), "confidence")
    assert confidence.p_value < 1e-6 and confidence.passed is True  # significant, but below 0.02
    assert "below the 0.02 threshold" in confidence.detail
    much_lower = dataclasses.replace(reference, confidence=reference.confidence - 0.05)
    assert check(compare(reference, much_lower), "confidence").passed is False


def test_more_pictures_rejected_fails_the_not_digit_rate(reference):
    report = compare(reference, window(7, not_digit_rate=0.08))
    assert "not_digit_rate" in failed_names(report)
    rate = check(report, "not_digit_rate")
    assert rate.reference < 0.02 and rate.window > 0.05


@pytest.mark.parametrize("side", ["reference", "window"])
def test_the_not_digit_rate_is_skipped_without_a_verdict(reference, side):
    unverdicted = window(8, not_digit_rate=0.5, verdict=False)
    pair = (dataclasses.replace(reference, is_digit=None), window(8)) if side == "reference" else (reference,
                                                                                                  unverdicted)
    report = compare(*pair)
    rate = check(report, "not_digit_rate")
    assert rate.passed is None and rate.p_value is None and f"{side} has no digit verdict" in rate.detail
    assert len(report.ran) == ALL_CHECKS - 1
    assert report.alpha_per_check == pytest.approx(0.01 / (ALL_CHECKS - 1))  # Bonferroni over those that ran


def test_alpha_is_split_over_the_checks_that_ran(reference):
    sample = window(17)
    quiet = DriftSettings(min_ks_statistic=0.0)  # significance alone decides the feature checks
    smallest = min((check for check in compare(reference, sample, quiet).checks if check.name in FEATURE_CHECKS),
                   key=lambda check: check.p_value)
    just_above = DriftSettings(alpha=smallest.p_value * ALL_CHECKS * 1.01, min_ks_statistic=0.0)
    just_below = DriftSettings(alpha=min(smallest.p_value * ALL_CHECKS * 0.99, 0.99), min_ks_statistic=0.0)
    assert smallest.name in failed_names(compare(reference, sample, just_above))
    assert smallest.name not in failed_names(compare(reference, sample, just_below))  # p < alpha, not alpha / 12


def test_feedback_accuracy_dropping_is_caught(reference):
    report = compare(reference, window(9, accuracy=0.85, feedback_share=0.5))
    assert failed_names(report) == {"feedback_accuracy"}
    accuracy = check(report, "feedback_accuracy")
    assert accuracy.reference > 0.95 and accuracy.window < 0.9 and report.n_feedback > 100


@pytest.mark.parametrize("feedback_share", [None, 0.05])
def test_feedback_accuracy_is_skipped_under_min_feedback(reference, feedback_share):
    report = compare(reference, window(10, accuracy=0.5, feedback_share=feedback_share))
    accuracy = check(report, "feedback_accuracy")
    assert accuracy.passed is None and "labelled rows < 30" in accuracy.detail
    assert report.status == "ok"


def test_feedback_accuracy_is_skipped_without_reference_labels(reference):
    report = compare(dataclasses.replace(reference, true_labels=None), window(11, accuracy=0.5, feedback_share=0.5))
    accuracy = check(report, "feedback_accuracy")
    assert accuracy.passed is None and "reference has no true labels" in accuracy.detail


def test_an_answer_is_right_when_it_names_the_digit_or_rejects_a_non_digit():
    features = np.zeros((4, len(FEATURES)))
    verdict = Sample(features, [3, 3, 3, 5], [0.9] * 4, np.array([True, False, False, True]), [3, 3, NOT_A_DIGIT,
                                                                                               NOT_A_DIGIT])
    assert correct_answers(verdict).tolist() == [True, False, True, False]
    no_verdict = dataclasses.replace(verdict, is_digit=None)
    assert correct_answers(no_verdict).tolist() == [True, True, False, False]


def test_too_few_rows_give_no_verdict(reference):
    report = compare(reference, window(12, n=57, change=thicker, confidence_beta=1.0))
    assert report.status == "too_few" and report.failed == () and report.n_window == 57
    assert len(report.checks) == ALL_CHECKS
    assert all(check.passed is None and "too few rows (57 < 200)" in check.detail for check in report.checks)
    assert report.alpha_per_check is None


def test_the_report_is_strict_json(reference):
    for report in (compare(reference, window(13, change=thicker)), compare(reference, window(14, n=20)),
                   compare(reference, window(15, feedback_share=None, verdict=False))):
        loaded = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        assert list(loaded) == ["status", "n_reference", "n_window", "n_feedback", "alpha_per_check", "failed",
                                "settings", "checks"]
        assert loaded["failed"] == [check.name for check in report.failed]
        assert [check["name"] for check in loaded["checks"]] == [check.name for check in report.checks]
        assert all(type(check["statistic"]) in (float, type(None)) for check in loaded["checks"])


def test_a_report_json_keeps_the_numbers(reference):
    entry = compare(reference, window(16, change=thicker)).to_dict()["checks"][0]
    assert entry["name"] == "feature:ink_fraction" and entry["passed"] is False
    assert entry["p_value"] < 1e-10 and entry["effect"] == entry["statistic"] and entry["window"] > 0.1


def sample_parts(n: int = 5) -> dict:
    return {"features": np.zeros((n, len(FEATURES))), "labels": np.zeros(n, int), "confidence": np.full(n, 0.9),
            "is_digit": np.ones(n, bool), "true_labels": np.full(n, -1)}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("features", np.zeros((5, len(FEATURES) - 1)), "features must have shape"),
    ("features", np.zeros(len(FEATURES)), "features must have shape"),
    ("features", np.full((5, len(FEATURES)), np.nan), "NaN"),
    ("labels", np.zeros(4, int), "labels must have one value per row"),
    ("labels", np.full(5, 10), r"labels must lie in 0\.\.9"),
    ("labels", np.full(5, 1.5), "labels must be integers"),
    ("confidence", np.full(6, 0.9), "confidence must have one value per row"),
    ("confidence", np.full(5, 1.5), "confidence must be a probability"),
    ("is_digit", np.ones(4, bool), "is_digit must have one value per row"),
    ("is_digit", np.ones(5), "is_digit must be booleans"),
    ("true_labels", np.full(5, 11), r"true_labels must lie in -1\.\.10"),
])
def test_mismatched_inputs_raise_naming_the_problem(field, value, message):
    with pytest.raises(ValueError, match=message):
        Sample(**{**sample_parts(), field: value})


def test_an_empty_reference_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="reference sample is empty"):
        compare(Sample(**sample_parts(0)), Sample(**sample_parts(300)))
    with pytest.raises(ValueError, match="alpha"):
        DriftSettings(alpha=0)
    with pytest.raises(ValueError, match="min_window"):
        DriftSettings(min_window=0)


def test_p_values_read_short():
    assert [format_p_value(p) for p in (None, 0.0, 1e-30, 0.0034, 0.5, 1.0)] == ["-", "<1e-300", "1e-30", "0.0034",
                                                                                  "0.5", "1"]

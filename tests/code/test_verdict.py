"""The digit verdict on small synthetic arrays: threshold from validation only, acceptance at the
target on the fitting digits, exact save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import verdict

D = 16
EXTRA = 8


def fake_set(rng, count, digit=True):
    """Probabilities, features, pixels and labels that look like digits (or not)."""
    labels = rng.integers(0, 10, count)
    centres = np.eye(10, D) * 6.0
    features = np.maximum(centres[labels] + rng.normal(0, 1.0, (count, D)), 0) if digit else \
        np.abs(rng.normal(1.0, 2.0, (count, D)))
    extra = np.abs(rng.normal(1.0, 0.3, (count, EXTRA))) if digit else np.abs(rng.normal(2.0, 1.0, (count, EXTRA)))
    features = np.c_[features, extra]  # dense features, then the conv channel statistics
    pixels = np.zeros((count, 28, 28), dtype=np.uint8)
    for i in range(count):
        h, w = rng.integers(10, 20, 2) if digit else rng.integers(5, 21, 2)
        pixels[i, 4 : 4 + h, 4 : 4 + w] = rng.integers(1, 256, (h, w)) if digit else 255
    return features, pixels, labels


@pytest.fixture(scope="module")
def model_parts():
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(0, 0.5, (D, 10)) + np.eye(D, 10), np.zeros(10)

    def with_probs(features, pixels, labels=None):
        logits = features[:, :D] @ weights + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return (p, features, pixels) + ((labels,) if labels is not None else ())

    train = with_probs(*fake_set(rng, 600))
    val = with_probs(*fake_set(rng, 400))[:3]
    test = with_probs(*fake_set(rng, 300))[:3]
    negatives = with_probs(*fake_set(rng, 300, digit=False)[:2])
    return {"weights": weights, "bias": bias, "train": train, "val": val, "test": test, "negatives": negatives,
            "with_probs": with_probs, "rng": rng}


def fit(parts, method, val=None, target=0.95):
    return verdict.fit_verdict(method, *(val or parts["val"]), target, weights=parts["weights"], bias=parts["bias"],
                               train=parts["train"], negatives=parts["negatives"])


@pytest.mark.parametrize("method", verdict.METHODS)
def test_acceptance_reaches_the_target_on_the_fitting_digits(model_parts, method):
    for target in (0.9, 0.95, 0.995):
        state = fit(model_parts, method, target=target)
        accepted = verdict.is_digit(state, *model_parts["val"]).mean()
        assert target <= accepted <= target + 0.01


@pytest.mark.parametrize("method", ["msp", "energy", "combined"])
def test_threshold_depends_only_on_validation(model_parts, method):
    state = fit(model_parts, method)
    other = verdict.fit_verdict(method, *model_parts["val"], 0.95, weights=model_parts["weights"],
                                bias=model_parts["bias"], train=model_parts["train"], negatives=model_parts["negatives"])
    assert other.threshold == state.threshold
    # the test set is no input to fitting, so changing it cannot move the threshold; changing validation can
    changed_val = model_parts["with_probs"](*fake_set(np.random.default_rng(9), 400)[:2])
    assert fit(model_parts, method, val=changed_val).threshold != state.threshold


def test_changing_test_data_leaves_the_state_unchanged(model_parts, tmp_path):
    before = fit(model_parts, "combined")
    parts = dict(model_parts, test=model_parts["with_probs"](*fake_set(np.random.default_rng(5), 300)[:2]))
    after = fit(parts, "combined")
    verdict.save_state(before, tmp_path / "a.npz")
    verdict.save_state(after, tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert all(np.array_equal(a[key], b[key]) for key in a.files)


@pytest.mark.parametrize("method", verdict.METHODS)
def test_save_load_round_trip_gives_identical_scores(model_parts, method, tmp_path):
    state = fit(model_parts, method)
    verdict.save_state(state, tmp_path / "verdict.npz")
    loaded = verdict.load_state(tmp_path / "verdict.npz")
    assert loaded.method == state.method and loaded.threshold == state.threshold
    for data in (model_parts["test"], model_parts["negatives"]):
        assert np.array_equal(verdict.digit_scores(state, *data), verdict.digit_scores(loaded, *data))


def test_guards_reject_blank_full_and_one_pixel(model_parts):
    state = fit(model_parts, "msp")
    pixels = np.zeros((3, 28, 28), dtype=np.uint8)
    pixels[1] = 255
    pixels[2, 14, 14] = 255
    probs = np.full((3, 10), 0.0)
    probs[:, 3] = 1.0
    features = np.zeros((3, D + EXTRA))
    assert not verdict.is_digit(state, probs, features, pixels).any()


def test_combined_separates_the_synthetic_negatives(model_parts):
    state = fit(model_parts, "combined")
    assert verdict.is_digit(state, *model_parts["negatives"]).mean() < 0.2
    assert verdict.is_digit(state, *model_parts["test"]).mean() > 0.85


def test_mahalanobis_matches_a_direct_computation(model_parts):
    state = fit(model_parts, "mahalanobis")
    features = model_parts["test"][1][:5, :D]
    direct = [-min((f - m) @ state.precision @ (f - m) for m in state.means) for f in features]
    assert np.allclose(verdict.mahalanobis(state, features), direct)

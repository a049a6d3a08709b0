"""Fit the digit verdict and measure it like accuracy: what `evaluate` writes to `paths.ood`.

A model is seen through `Outputs`, a function of raw pixels to (probabilities, features): the
registered ONNX file in `evaluate` (the path that serves), a Keras model in `bench/ood.py`.
The verdict (`core.verdict`) is fitted on training digits, validation digits and the generated
calibration non-digits (`core.nondigits`); its threshold comes from validation digits alone. It is
then measured on the test digits, the handwriting set and the heldout non-digits, which share no
family with the calibration ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.core import nondigits, verdict
from pipeline.core.verdict import ACCEPTANCE_TAG, REJECTION_TAG

USERS_KIND = "users"  # the calibration kind of pictures users labelled "not a digit"
Outputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # pixels (n, 28, 28) -> (probabilities, features)


@dataclass(frozen=True)
class Seen:
    """What a model made of some pictures: its outputs and the pixels it read."""

    probabilities: np.ndarray
    features: np.ndarray
    pixels: np.ndarray

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.probabilities, self.features, self.pixels


def look(outputs: Outputs, pixels: np.ndarray) -> Seen:
    pixels = np.asarray(pixels, dtype=np.float32)
    probabilities, features = outputs(pixels)
    return Seen(np.asarray(probabilities), np.asarray(features), pixels)


def subsample(x: np.ndarray, y: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `count` training digits, drawn with `seed` (all of them when there are fewer)."""
    if count >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(x), count, replace=False))
    return x[keep], y[keep]


def generated(split: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """The non-digits of one split, by kind; the two splits also differ in seed."""
    return nondigits.generate_all(count, seed=seed if split == "calibration" else seed + 1000, split=split)


def fit(method: str, target_acceptance: float, weights: np.ndarray, bias: np.ndarray, train: Seen,
        train_labels: np.ndarray, validation: Seen, calibration: dict[str, Seen],
        guard_pixels: np.ndarray | None = None) -> verdict.VerdictState:
    """The verdict `method`, its threshold at `target_acceptance` of the validation digits."""
    negatives = tuple(np.concatenate(part) for part in zip(*(seen.parts() for seen in calibration.values())))
    return verdict.fit_verdict(method, *validation.parts(), target_acceptance, weights=weights, bias=bias,
                               train=(*train.parts(), train_labels), negatives=negatives, guard_pixels=guard_pixels)


def version_tags(report: dict) -> dict[str, str]:
    """The registered version's verdict figures (beside its verdict file's tags)."""
    accepted = report["accepted"]
    return {"digit_verdict_method": report["method"], "digit_threshold": f"{report['threshold']:.6f}",
            ACCEPTANCE_TAG: f"{accepted['test_digits']:.6f}", "handwriting_digit_acceptance": f"{accepted['handwriting']:.6f}",
            REJECTION_TAG: f"{report['rejected_heldout']:.6f}",
            **{f"{REJECTION_TAG}_{kind}": f"{row['rejected']:.6f}" for kind, row in report["heldout"].items()}}


def run_metrics(report: dict) -> dict[str, float]:
    """The report as flat MLflow metrics (`ood_...`)."""
    metrics = {f"ood_accepted_{name}": value for name, value in report["accepted"].items()}
    metrics["ood_rejected_heldout"] = report["rejected_heldout"]
    for split in ("heldout", "calibration"):
        for kind, row in report[split].items():
            metrics.update({f"ood_{split}_{kind}_{figure}": value for figure, value in row.items()})
    return metrics


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of digits (positive) against non-digits; guard-rejected = lowest."""
    from sklearn.metrics import roc_auc_score

    scores = np.nan_to_num(np.r_[positive, negative], neginf=-1e300)
    return float(roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], scores))


def report(state: verdict.VerdictState, validation: Seen, test: Seen, handwriting: Seen, handwriting_total: int,
           heldout: dict[str, Seen], calibration: dict[str, Seen]) -> dict:
    """The DVC metric: acceptance of digits, and per kind of non-digit its AUROC against the test
    digits and the share rejected at the shipped threshold (heldout: never fitted on).
    `handwriting_total` counts pictures that could not be prepared, as not accepted."""
    def scores(seen: Seen) -> np.ndarray:
        return verdict.digit_scores(state, *seen.parts())

    test_scores = scores(test)

    def kinds(sets: dict[str, Seen]) -> dict[str, dict[str, float]]:
        out = {}
        for kind, seen in sets.items():
            negative = scores(seen)
            out[kind] = {"auroc": round(auroc(test_scores, negative), 6),
                         "rejected": round(float(np.mean(negative < state.threshold)), 6)}
        return out

    held = kinds(heldout)
    return {
        "method": state.method,
        "threshold": round(state.threshold, 6),
        "accepted": {
            "validation_digits": round(float(np.mean(scores(validation) >= state.threshold)), 6),
            "test_digits": round(float(np.mean(test_scores >= state.threshold)), 6),
            "handwriting": round(float(np.sum(scores(handwriting) >= state.threshold) / max(handwriting_total, 1)), 6),
        },
        "rejected_heldout": round(float(np.mean([row["rejected"] for row in held.values()])), 6),
        "heldout": held,
        "calibration": kinds(calibration),
    }


def fit_and_report(outputs: Outputs, head: tuple[np.ndarray, np.ndarray], settings, seed: int,
                   train: tuple[np.ndarray, np.ndarray], validation_pixels: np.ndarray, test_pixels: np.ndarray,
                   handwriting: tuple[np.ndarray, int], users_nondigits: np.ndarray | None = None,
                   users_digits: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[verdict.VerdictState, dict]:
    """Fit `settings.digit_verdict` (the evaluate params) through `outputs` and measure it.

    `head`: the softmax layer's (kernel, bias); `train`: training digits and labels, of which
    `settings.verdict_train_images` are used; `handwriting`: prepared pixels and the set's size;
    `users_nondigits`: pictures users called no digit (feedback's training part), fitted on as one
    more calibration kind; `users_digits`: the digits they confirmed, (pixels, labels), always among
    the training digits and inside the guards (a new pen or scanner must not stay "no digit").
    """
    train_x, train_y = subsample(*train, settings.verdict_train_images, seed)
    guard_pixels = None
    if users_digits is not None and len(users_digits[1]):
        train_x, train_y = np.concatenate([train_x, users_digits[0]]), np.concatenate([train_y, users_digits[1]])
        guard_pixels = np.concatenate([np.asarray(validation_pixels, np.float32), np.asarray(users_digits[0], np.float32)])
    calibration = {kind: look(outputs, x) for kind, x in generated("calibration", settings.nondigits_per_kind, seed).items()}
    if users_nondigits is not None and len(users_nondigits):
        calibration[USERS_KIND] = look(outputs, users_nondigits)
    heldout = {kind: look(outputs, x) for kind, x in generated("heldout", settings.nondigits_per_kind, seed).items()}
    validation = look(outputs, validation_pixels)
    state = fit(settings.digit_verdict, settings.digit_acceptance, *head, look(outputs, train_x), train_y,
                validation, calibration, guard_pixels)
    return state, report(state, validation, look(outputs, test_pixels), look(outputs, handwriting[0]), handwriting[1],
                         heldout, calibration)

"""The digit verdict: does a picture look like a digit the model knows? Pure numpy.

Inputs per picture: the model's softmax `probabilities` (N, 10), its `features` and the 28x28
`pixels` the model saw. `features` (N, D + C) is the ONNX model's second output
(`core.export.feature_output`): the D numbers the softmax layer reads, then C per-channel means and
standard deviations of early layers (for the `fast` preset 128 + 96). Scores (higher = more digit-like):

- `msp`: the maximum softmax probability;
- `max_logit` / `energy`: the largest logit / logsumexp of the logits, the logits recomputed
  from the features with the last layer's weights (saved in the state);
- `mahalanobis`: minus the smallest squared Mahalanobis distance of the features to a class mean
  (class means and one shared covariance fitted on training digits);
- `conv_mahalanobis`: the same on the convolutional channel statistics (a class-conditional
  Gaussian on early-layer activations, after Lee et al. 2018);
- `combined`: a logistic regression over standardised scores (energy, both Mahalanobis scores,
  log-MSP and ink statistics), fitted on training digits against generated calibration non-digits;
- `reject_head`: the same logistic regression over those scores plus the features themselves
  (a post-hoc linear "not a digit" head; the network is not retrained).

Every method has cheap input guards: the ink fraction and the ink's bounding box must fall in the
range seen on validation digits, otherwise the score is -inf (blank, one pixel, full ink, noise).

The threshold is chosen on validation digits only: the score at which `target_acceptance` of
them are accepted. The whole state saves to a small .npz (`save_state`/`load_state`, exact round
trip) and applies with numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.core.config import VERDICT_METHODS as METHODS
from pipeline.core.data import IMAGE_SIDE
from pipeline.core.hashing import write_stable_npz

COMBINED_INPUTS = ("energy", "mahalanobis", "conv_mahalanobis", "log_msp", "ink_fraction", "ink_mean",
                   "box_height", "box_width")
# a registered version's tags: its verdict file (a run artifact) and that file's sha256, which every
# loader checks; and the share of test digits the verdict accepts and of unseen non-digits it rejects
VERDICT_TAGS = {"sha256": "digit_verdict_sha256", "file": "digit_verdict_file"}
ACCEPTANCE_TAG, REJECTION_TAG = "digit_acceptance", "nondigits_rejected"
INK_LEVEL = 0  # a pixel above this counts as ink (MNIST background is exactly 0)


@dataclass
class VerdictState:
    method: str
    threshold: float
    target_acceptance: float
    guard_low: np.ndarray  # (3,) ink fraction, box height, box width: smallest allowed
    guard_high: np.ndarray  # (3,) largest allowed
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # last layer (D, 10)
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (10,)
    means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # class means (10, D)
    precision: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # shared (D, D)
    conv_means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # class means (10, C)
    conv_precision: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # shared (C, C)
    centre: np.ndarray = field(default_factory=lambda: np.zeros(0))  # combined: input means
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0))  # combined: input std devs
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))  # combined: logistic weights (+1 bias)
    # derived per (means, precision) pair on first use, not saved: precision @ means.T and each mean's own term
    derived: dict = field(default_factory=dict, repr=False, compare=False)


# --- input statistics -------------------------------------------------------------------------

def ink_stats(pixels: np.ndarray) -> np.ndarray:
    """(N, 4): ink fraction, bounding-box height and width (pixels), mean ink level (0-1)."""
    pixels = np.asarray(pixels, dtype=np.float32).reshape(len(pixels), IMAGE_SIDE, IMAGE_SIDE)
    ink = pixels > INK_LEVEL
    count = ink.sum(axis=(1, 2))
    rows, cols = ink.any(axis=2), ink.any(axis=1)

    def extent(mask: np.ndarray) -> np.ndarray:
        first = np.argmax(mask, axis=1)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        return np.where(mask.any(axis=1), last - first + 1, 0)

    mean = np.where(count > 0, pixels.sum(axis=(1, 2)) / np.maximum(count, 1) / 255.0, 0.0)
    return np.stack([count / IMAGE_SIDE**2, extent(rows), extent(cols), mean], axis=1).astype(np.float64)


def guards_pass(state: VerdictState, pixels: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
    stats = (ink_stats(pixels) if stats is None else stats)[:, :3]
    return np.all((stats >= state.guard_low) & (stats <= state.guard_high), axis=1)


# --- raw scores -----------------------------------------------------------------------------

def logits_of(state: VerdictState, features: np.ndarray) -> np.ndarray:
    return np.asarray(features, dtype=np.float64) @ state.weights + state.bias


def logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def split_features(features: np.ndarray, dense_width: int) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features[:, :dense_width], features[:, dense_width:]


def mahalanobis(state: VerdictState, features: np.ndarray, means: np.ndarray | None = None,
                precision: np.ndarray | None = None) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance to a class mean (the dense features by default)."""
    means = state.means if means is None else means
    precision = state.precision if precision is None else precision
    key = (id(means), id(precision))
    if key not in state.derived:  # the arrays are set once fitted; serving reuses these per request
        state.derived[key] = (means, precision, precision @ means.T, ((means @ precision) * means).sum(axis=1))
    _, _, projected_means, mean_terms = state.derived[key]
    features = np.asarray(features, dtype=np.float64)[:, : means.shape[1]]
    own = np.einsum("nd,nd->n", features @ precision, features)
    distances = own[:, None] - 2.0 * (features @ projected_means) + mean_terms[None, :]
    return -distances.min(axis=1)


def raw_scores(state: VerdictState, probabilities: np.ndarray, features: np.ndarray | None,
               pixels: np.ndarray, stats: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score the state can compute (those that need absent parts are left out); `stats`:
    `ink_stats(pixels)` when already computed."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    msp = probabilities.max(axis=1)
    stats = ink_stats(pixels) if stats is None else stats
    out = {"msp": msp, "log_msp": np.log(np.clip(msp, 1e-12, 1.0)) - np.log(np.clip(1.0 - msp, 1e-12, 1.0)),
           "ink_fraction": stats[:, 0], "box_height": stats[:, 1], "box_width": stats[:, 2], "ink_mean": stats[:, 3]}
    dense = conv = None
    if features is not None:
        dense, conv = split_features(features, state.weights.shape[0] if state.weights.size else state.means.shape[1])
    if features is not None and state.weights.size:
        logits = logits_of(state, dense)
        out["max_logit"] = logits.max(axis=1)
        out["energy"] = logsumexp(logits)
    if features is not None and state.means.size:
        out["mahalanobis"] = mahalanobis(state, dense)
    if features is not None and state.conv_means.size:
        out["conv_mahalanobis"] = mahalanobis(state, conv, state.conv_means, state.conv_precision)
    if features is not None:
        out["features"] = dense
    return out


def combined_inputs(scores: dict[str, np.ndarray], method: str = "combined") -> np.ndarray:
    inputs = np.stack([scores[name] for name in COMBINED_INPUTS], axis=1)
    return np.c_[inputs, scores["features"]] if method == "reject_head" else inputs


def method_score(state: VerdictState, scores: dict[str, np.ndarray]) -> np.ndarray:
    if state.method in ("combined", "reject_head"):
        z = (combined_inputs(scores, state.method) - state.centre) / state.scale
        return z @ state.coef[:-1] + state.coef[-1]
    return scores[state.method]


def digit_scores(state: VerdictState, probabilities: np.ndarray, features: np.ndarray | None,
                 pixels: np.ndarray) -> np.ndarray:
    """The verdict's score per picture (higher = more digit-like); -inf where a guard fails."""
    stats = ink_stats(pixels)
    score = method_score(state, raw_scores(state, probabilities, features, pixels, stats))
    return np.where(guards_pass(state, pixels, stats), score, -np.inf)


def is_digit(state: VerdictState, probabilities: np.ndarray, features: np.ndarray | None,
             pixels: np.ndarray) -> np.ndarray:
    return digit_scores(state, probabilities, features, pixels) >= state.threshold


def feature_width(state: VerdictState) -> int:
    """How many features the state reads: the softmax layer's inputs, then the channel statistics."""
    return state.weights.shape[0] + (state.conv_means.shape[1] if state.conv_means.size else 0)


# --- fitting --------------------------------------------------------------------------------

def class_statistics(features: np.ndarray, labels: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Class means (10, D) and the shared precision matrix (D, D) of training features."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(10)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    covariance += ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    return means, np.linalg.inv(covariance)


def logistic_fit(inputs: np.ndarray, targets: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Weights (+ bias last) of an L2-regularised logistic regression, by Newton's method, classes balanced."""
    x = np.c_[inputs, np.ones(len(inputs))]
    y = targets.astype(np.float64)
    weight = np.where(y > 0, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
    coef = np.zeros(x.shape[1])
    penalty = l2 * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ coef, -30, 30)))
        gradient = x.T @ (weight * (p - y)) + penalty @ coef
        hessian = (x * (weight * p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        coef -= step
        if np.abs(step).max() < 1e-10:
            break
    return coef


def threshold_for(scores: np.ndarray, target_acceptance: float) -> float:
    """The largest threshold at which at least `target_acceptance` of `scores` are >= it."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rejected = int(np.floor((1.0 - target_acceptance) * len(ordered) + 1e-9))
    finite = ordered[np.isfinite(ordered)]
    return float(max(ordered[min(rejected, len(ordered) - 1)], finite[0]))  # never -inf: guards stay in force


def fit_verdict(method: str, val_probabilities: np.ndarray, val_features: np.ndarray | None, val_pixels: np.ndarray,
                target_acceptance: float = 0.995, *, weights: np.ndarray, bias: np.ndarray,
                train: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
                negatives: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                l2: float = 1e-3, guard_pixels: np.ndarray | None = None) -> VerdictState:
    """Fit a verdict. The threshold comes from the validation digits alone, the guards from them or
    `guard_pixels` (validation digits plus digits users confirmed).

    `weights`, `bias`: the softmax layer's kernel (D, 10) and bias (they also say how many features are dense);
    `train`: (probabilities, features, pixels, labels) of training digits: the Mahalanobis statistics
    and the logistic regression's positives (mahalanobis, combined, reject_head);
    `negatives`: (probabilities, features, pixels) of calibration non-digits (combined, reject_head).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    stats = ink_stats(val_pixels if guard_pixels is None else guard_pixels)[:, :3]
    state = VerdictState(method=method, threshold=0.0, target_acceptance=float(target_acceptance),
                         guard_low=stats.min(axis=0), guard_high=stats.max(axis=0),
                         weights=np.asarray(weights, dtype=np.float64), bias=np.asarray(bias, dtype=np.float64))
    if train is not None and method in ("mahalanobis", "conv_mahalanobis", "combined", "reject_head"):
        dense, conv = split_features(train[1], state.weights.shape[0])
        state.means, state.precision = class_statistics(dense, train[3])
        if conv.shape[1]:
            state.conv_means, state.conv_precision = class_statistics(conv, train[3])
    if method in ("combined", "reject_head"):
        if negatives is None or train is None:
            raise ValueError(f"the {method} method needs training digits and calibration non-digits")
        positive = combined_inputs(raw_scores(state, *train[:3]), method)
        negative = combined_inputs(raw_scores(state, *negatives), method)
        negative = negative[guards_pass(state, negatives[2])]  # the guards already reject the rest
        state.centre = positive.mean(axis=0)
        state.scale = positive.std(axis=0) + 1e-6
        inputs = (np.r_[positive, negative] - state.centre) / state.scale
        state.coef = logistic_fit(inputs, np.r_[np.ones(len(positive)), np.zeros(len(negative))], l2=l2)
    scores = digit_scores(state, val_probabilities, val_features, val_pixels)
    state.threshold = threshold_for(scores, target_acceptance)
    return state


# --- saving ---------------------------------------------------------------------------------

ARRAYS = ("guard_low", "guard_high", "weights", "bias", "means", "precision", "conv_means", "conv_precision",
          "centre", "scale", "coef")


def save_state(state: VerdictState, target: str | Path | BinaryIO) -> None:
    """A .npz with every array, plus method, threshold and target as 0-d arrays (exact float64).
    Byte-for-byte the same for the same state: every member has a fixed date (np.savez stamps the
    current time)."""
    arrays = {"method": np.array(state.method), "threshold": np.array(state.threshold, dtype=np.float64),
              "target_acceptance": np.array(state.target_acceptance, dtype=np.float64),
              **{name: np.asarray(getattr(state, name), dtype=np.float64) for name in ARRAYS}}
    write_stable_npz(arrays, target)


def load_state(path: str | Path) -> VerdictState:
    with np.load(path, allow_pickle=False) as data:
        return VerdictState(method=str(data["method"]), threshold=float(data["threshold"]),
                            target_acceptance=float(data["target_acceptance"]),
                            **{name: data[name].copy() for name in ARRAYS})

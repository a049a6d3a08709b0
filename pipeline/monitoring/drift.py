"""Drift statistics: does a window of the prediction log still look like the reference sample (the
validation split passed through the same features and the same model at registration)?

Every check has two gates, and fails only when it passes both:
- significance: its p-value is below `alpha / (number of checks that ran)` (Bonferroni), so a window
  of pure noise raises a false alarm with probability at most `alpha`;
- size: its effect (a KS statistic, a total-variation distance, a drop or a rise) reaches a threshold,
  so a large window does not alarm on differences too small to matter.

Pure functions of arrays: the `monitor` command reads the log and the reference, and writes the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from pipeline.core.data import NUM_CLASSES
from pipeline.monitoring.features import FEATURES

NOT_A_DIGIT = 10  # the true label a user gives for "not a digit"; -1 = no feedback
NO_FEEDBACK = -1

KS = "Kolmogorov-Smirnov"
CHI_SQUARE = "chi-square"
MANN_WHITNEY = "Mann-Whitney U (one-sided)"
BINOMIAL = "binomial (one-sided)"

FEATURE_PREFIX = "feature:"
CHECK_TESTS = {**{f"{FEATURE_PREFIX}{name}": KS for name in FEATURES}, "class_mix": CHI_SQUARE,
               "confidence": MANN_WHITNEY, "not_digit_rate": BINOMIAL, "feedback_accuracy": BINOMIAL}
CONFIDENCE_SLACK = 1e-6  # float32 softmax tops may round a hair above 1


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value, so compare by identity
class Sample:
    """Rows of model answers: the reference sample or a window of the prediction log."""

    features: np.ndarray  # (n, len(FEATURES)) float, from features.input_features
    labels: np.ndarray  # (n,) predicted class 0-9
    confidence: np.ndarray  # (n,) top probability 0-1
    is_digit: np.ndarray | None  # (n,) bool; None when the model version has no verdict
    true_labels: np.ndarray | None = None  # (n,) int: 0-9, NOT_A_DIGIT, or -1 where unknown

    def __post_init__(self) -> None:
        features = np.asarray(self.features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(FEATURES):
            raise ValueError(f"features must have shape (n, {len(FEATURES)}), one column per FEATURES name; "
                             f"got {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("features hold NaN or infinity")
        n = len(features)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "labels", _integer_column("labels", self.labels, n, 0, NUM_CLASSES - 1))
        object.__setattr__(self, "confidence", _confidence_column(self.confidence, n))
        if self.is_digit is not None:
            object.__setattr__(self, "is_digit", _boolean_column("is_digit", self.is_digit, n))
        if self.true_labels is not None:
            object.__setattr__(self, "true_labels",
                               _integer_column("true_labels", self.true_labels, n, NO_FEEDBACK, NOT_A_DIGIT))

    def __len__(self) -> int:
        return len(self.features)

    @property
    def has_feedback(self) -> np.ndarray:
        """(n,) bool: the rows whose true label is known."""
        if self.true_labels is None:
            return np.zeros(len(self), dtype=bool)
        return self.true_labels != NO_FEEDBACK


def _column(name: str, values, n: int) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (n,):
        raise ValueError(f"{name} must have one value per row of features ({n}); got shape {array.shape}")
    return array


def _integer_column(name: str, values, n: int, low: int, high: int) -> np.ndarray:
    array = _column(name, values, n)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or (array != np.round(array)).any():
        raise ValueError(f"{name} must be integers {low}..{high}")
    if n and (array.min() < low or array.max() > high):
        raise ValueError(f"{name} must lie in {low}..{high}; got {array.min()}..{array.max()}")
    return array.astype(np.int64)


def _confidence_column(values, n: int) -> np.ndarray:
    array = _column("confidence", values, n)
    if not np.issubdtype(array.dtype, np.number) or array.dtype == bool:
        raise ValueError("confidence must be numbers 0-1")
    array = array.astype(np.float64)
    if n and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1 + CONFIDENCE_SLACK):
        raise ValueError(f"confidence must be a probability 0-1; got {array.min()}..{array.max()}")
    return array


def _boolean_column(name: str, values, n: int) -> np.ndarray:
    array = _column(name, values, n)
    if array.dtype != bool:
        raise ValueError(f"{name} must be booleans (or None for a whole sample without a verdict); "
                         f"got dtype {array.dtype}")
    return array


@dataclass(frozen=True)
class DriftSettings:
    """The knobs of `compare` (the command maps params.yaml's `monitor.*` onto these)."""

    alpha: float = 0.01  # family-wise false-alarm rate per window, Bonferroni-split over the checks that run
    min_window: int = 200  # fewer rows in the window: no verdict at all (status "too_few")
    min_feedback: int = 30  # fewer labelled rows: the feedback-accuracy check is skipped
    min_ks_statistic: float = 0.1  # a feature fails only if significant AND its KS statistic is at least this
    min_class_shift: float = 0.1  # class mix fails only if significant AND total-variation distance >= this
    max_confidence_drop: float = 0.02
    max_nondigit_rise: float = 0.02
    max_accuracy_drop: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1; got {self.alpha}")
        for name in ("min_window", "min_feedback"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("min_ks_statistic", "min_class_shift", "max_confidence_drop", "max_nondigit_rise",
                     "max_accuracy_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in 0..1; got {getattr(self, name)}")


@dataclass(frozen=True)
class Check:
    """One check's outcome; `passed` is None when it was skipped, and `detail` then says why."""

    name: str  # "feature:ink_fraction", ..., "class_mix", "confidence", "not_digit_rate", "feedback_accuracy"
    test: str  # "Kolmogorov-Smirnov", "chi-square", "Mann-Whitney U (one-sided)", "binomial (one-sided)"
    statistic: float  # the test's statistic; NaN when skipped
    p_value: float | None
    reference: float | None  # a readable summary on each side: a feature's mean, a rate, an accuracy
    window: float | None
    passed: bool | None
    detail: str  # one short line for a terminal
    effect: float | None = None  # the size the threshold is compared with (a KS statistic, a TV distance, a drop)


def split_alpha(alpha: float, checks_run: int) -> float:
    """Bonferroni: each of `checks_run` checks at alpha / checks_run keeps the window's false-alarm
    rate at most alpha."""
    return alpha / checks_run


@dataclass(frozen=True)
class DriftReport:
    """Every check in a fixed order (features, class_mix, confidence, not_digit_rate, feedback_accuracy)."""

    checks: tuple[Check, ...]
    n_reference: int
    n_window: int
    n_feedback: int
    status: str  # "ok" | "drift" | "too_few"
    settings: DriftSettings = DriftSettings()

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.passed is False)

    @property
    def ran(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.passed is not None)

    @property
    def alpha_per_check(self) -> float | None:
        """The significance level each check that ran was held to (None when none ran)."""
        return split_alpha(self.settings.alpha, len(self.ran)) if self.ran else None

    def to_dict(self) -> dict:
        """JSON-able, with stable keys: plain floats, and None where a number is missing or not finite."""
        return {"status": self.status, "n_reference": self.n_reference, "n_window": self.n_window,
                "n_feedback": self.n_feedback, "alpha_per_check": _json_number(self.alpha_per_check),
                "failed": [check.name for check in self.failed], "settings": asdict(self.settings),
                "checks": [_check_dict(check) for check in self.checks]}


def _json_number(value) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _check_dict(check: Check) -> dict:
    return {"name": check.name, "test": check.test, "statistic": _json_number(check.statistic),
            "p_value": _json_number(check.p_value), "reference": _json_number(check.reference),
            "window": _json_number(check.window), "effect": _json_number(check.effect),
            "passed": None if check.passed is None else bool(check.passed), "detail": check.detail}


def format_p_value(p_value: float | None) -> str:
    """'1e-30', '0.0034', '0.5', '<1e-300', or '-' when there is none."""
    if p_value is None:
        return "-"
    if p_value < 1e-300:
        return "<1e-300"
    return f"{p_value:.0e}" if p_value < 1e-4 else f"{p_value:.2g}"


@dataclass(frozen=True)
class Measurement:
    """A check's numbers before the verdict, which needs to know how many checks ran."""

    name: str
    statistic: float
    p_value: float
    reference: float
    window: float
    effect: float
    threshold: float
    detail: str

    def judged(self, alpha_per_check: float) -> Check:
        """Fails only when both significant and large enough to matter."""
        significant = self.p_value < alpha_per_check
        large = self.effect >= self.threshold
        detail = self.detail
        if significant and not large:
            detail += f"; significant but below the {self.threshold:g} threshold"
        return Check(self.name, CHECK_TESTS[self.name], float(self.statistic), float(self.p_value),
                     float(self.reference), float(self.window), not (significant and large), detail,
                     float(self.effect))


def skipped(name: str, why: str) -> Check:
    return Check(name, CHECK_TESTS[name], math.nan, None, None, None, None, why)


def _p_value(value: float) -> float:
    """A p-value, with NaN (a degenerate test) read as no evidence."""
    return 1.0 if math.isnan(value) else float(value)


def feature_shift(reference: Sample, window: Sample, column: int, settings: DriftSettings) -> Measurement:
    """Two-sample KS on one feature: any change of its distribution (location, spread or shape)."""
    before, after = reference.features[:, column], window.features[:, column]
    result = stats.ks_2samp(before, after)
    p_value = _p_value(result.pvalue)
    return Measurement(f"{FEATURE_PREFIX}{FEATURES[column]}", result.statistic, p_value, before.mean(), after.mean(),
                       result.statistic, settings.min_ks_statistic,
                       f"mean {before.mean():.3g} -> {after.mean():.3g}, KS {result.statistic:.2f}, "
                       f"p {format_p_value(p_value)}")


def class_counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=NUM_CLASSES)


def class_mix_shift(reference: Sample, window: Sample, settings: DriftSettings) -> Measurement:
    """Chi-square homogeneity test of the predicted-class counts (reference vs window, classes absent
    from both left out); the effect is the total-variation distance between the class shares."""
    counts = np.stack([class_counts(reference.labels), class_counts(window.labels)])
    seen = counts.sum(axis=0) > 0
    result = stats.chi2_contingency(counts[:, seen], correction=False)
    shares = counts / counts.sum(axis=1, keepdims=True)
    moved = int(np.abs(shares[1] - shares[0]).argmax())
    distance = 0.5 * np.abs(shares[1] - shares[0]).sum()
    p_value = _p_value(result.pvalue)
    return Measurement("class_mix", result.statistic, p_value, shares[0, moved], shares[1, moved], distance,
                       settings.min_class_shift,
                       f"class {moved} {shares[0, moved]:.1%} -> {shares[1, moved]:.1%}, TV {distance:.2f}, "
                       f"chi2 {result.statistic:.1f}, p {format_p_value(p_value)}")


def confidence_drop(reference: Sample, window: Sample, settings: DriftSettings) -> Measurement:
    """One-sided Mann-Whitney U (window lower); the effect is the drop in mean confidence."""
    result = stats.mannwhitneyu(window.confidence, reference.confidence, alternative="less")
    before, after = reference.confidence.mean(), window.confidence.mean()
    p_value = _p_value(result.pvalue)
    return Measurement("confidence", result.statistic, p_value, before, after, before - after,
                       settings.max_confidence_drop,
                       f"mean {before:.3f} -> {after:.3f}, p {format_p_value(p_value)}")


def not_digit_rise(reference: Sample, window: Sample, settings: DriftSettings) -> Measurement | Check:
    """One-sided binomial test of the window's not-a-digit count against the reference's rate."""
    name = "not_digit_rate"
    for side, sample in (("reference", reference), ("window", window)):
        if sample.is_digit is None:
            return skipped(name, f"skipped: the {side} has no digit verdict")
    rate = float(np.mean(~reference.is_digit))
    rejected, n = int((~window.is_digit).sum()), len(window)
    result = stats.binomtest(rejected, n, rate, alternative="greater")
    return Measurement(name, rejected, result.pvalue, rate, rejected / n, rejected / n - rate,
                       settings.max_nondigit_rise,
                       f"rate {rate:.1%} -> {rejected / n:.1%} ({rejected}/{n}), p {format_p_value(result.pvalue)}")


def answered_right(true_labels: np.ndarray, labels: np.ndarray, is_digit: np.ndarray | None) -> np.ndarray:
    """(n,) bool: the answer matched the true label. A digit is answered right only when it was named
    and not rejected; a not-a-digit only when the verdict rejected it (never without a verdict)."""
    named_right = true_labels == labels  # NOT_A_DIGIT never equals a class 0-9
    if is_digit is None:
        return named_right
    return (named_right & is_digit) | ((true_labels == NOT_A_DIGIT) & ~is_digit)


def correct_answers(sample: Sample) -> np.ndarray:
    """`answered_right` for every row of a sample (all False without true labels)."""
    if sample.true_labels is None:
        return np.zeros(len(sample), dtype=bool)
    return answered_right(sample.true_labels, sample.labels, sample.is_digit)


def feedback_accuracy_drop(reference: Sample, window: Sample, settings: DriftSettings) -> Measurement | Check:
    """One-sided binomial test of the window's accuracy on rows with feedback against the reference's
    accuracy. (Users may report wrong answers more often than right ones: a drop is a signal to look,
    not an exact accuracy.)"""
    name = "feedback_accuracy"
    labelled = int(window.has_feedback.sum())
    if not reference.has_feedback.any():
        return skipped(name, "skipped: the reference has no true labels")
    if labelled < settings.min_feedback:
        return skipped(name, f"skipped: {labelled} labelled rows < {settings.min_feedback}")
    accuracy = float(correct_answers(reference)[reference.has_feedback].mean())
    right = int(correct_answers(window)[window.has_feedback].sum())
    result = stats.binomtest(right, labelled, accuracy, alternative="less")
    return Measurement(name, right, result.pvalue, accuracy, right / labelled, accuracy - right / labelled,
                       settings.max_accuracy_drop,
                       f"accuracy {accuracy:.1%} -> {right / labelled:.1%} on {labelled} labelled rows, "
                       f"p {format_p_value(result.pvalue)}")


def measure(reference: Sample, window: Sample, settings: DriftSettings) -> list[Measurement | Check]:
    """Every check in report order: a measurement, or a Check already skipped."""
    features = [feature_shift(reference, window, column, settings) for column in range(len(FEATURES))]
    return [*features, class_mix_shift(reference, window, settings), confidence_drop(reference, window, settings),
            not_digit_rise(reference, window, settings), feedback_accuracy_drop(reference, window, settings)]


def compare(reference: Sample, window: Sample, settings: DriftSettings = DriftSettings()) -> DriftReport:
    """The drift report of a window against the reference."""
    if len(reference) == 0:
        raise ValueError("the reference sample is empty")
    n_feedback = int(window.has_feedback.sum())
    if len(window) < settings.min_window:
        why = f"skipped: too few rows ({len(window):,} < {settings.min_window:,})"
        checks = tuple(skipped(name, why) for name in CHECK_TESTS)
        return DriftReport(checks, len(reference), len(window), n_feedback, "too_few", settings)
    outcomes = measure(reference, window, settings)
    alpha_per_check = split_alpha(settings.alpha, sum(isinstance(outcome, Measurement) for outcome in outcomes))
    checks = tuple(outcome.judged(alpha_per_check) if isinstance(outcome, Measurement) else outcome
                   for outcome in outcomes)
    status = "drift" if any(check.passed is False for check in checks) else "ok"
    return DriftReport(checks, len(reference), len(window), n_feedback, status, settings)

"""What `serve`, `web` and `predict` answer with: a classifier plus, when its version has one, the
digit verdict registered with it (`core.verdict`), so that all three decide by the same rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core import verdict
from pipeline.core.data import as_model_input

NO_VERDICT_NOTE = "the digit check is unavailable: this model version was registered before it existed"
LOCAL_FILE_NOTE = "the digit check is unavailable for a local .keras file: serve a registered version for it"


@dataclass(frozen=True)
class Answers:
    """The model's answers for n pictures: probabilities, and the verdict's scores (None: no verdict)."""

    probabilities: np.ndarray  # (n, 10)
    scores: np.ndarray | None = None  # (n,) higher = more digit-like; -inf where an input guard fails
    threshold: float | None = None
    version: str | None = None  # the registered version that answered; None for a local file

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, rows: slice) -> Answers:  # the micro-batcher hands each request its rows
        return Answers(self.probabilities[rows], None if self.scores is None else self.scores[rows], self.threshold,
                       self.version)

    @property
    def is_digit(self) -> np.ndarray | None:
        return None if self.scores is None else self.scores >= self.threshold

    def verdict_fields(self, index: int) -> dict[str, Any]:
        """{"is_digit", "digit_score"} of one picture (the score is null where a guard failed), or {}."""
        if self.scores is None:
            return {}
        score = float(self.scores[index])
        return {"is_digit": bool(score >= self.threshold),
                "digit_score": round(score, 4) if np.isfinite(score) else None}


class ServedModel:
    """A classifier (`probabilities` and, for the registered ONNX file, `outputs`) and its verdict."""

    def __init__(self, classifier: Any, state: verdict.VerdictState | None = None, version: str | None = None,
                 missing_verdict: str = LOCAL_FILE_NOTE) -> None:
        self.classifier = classifier
        self.state = state
        self.version = version  # the registered version's number; None for a local file
        self.missing_verdict = missing_verdict  # why there is no verdict, for users (when state is None)

    def without_verdict(self, reason: str) -> ServedModel:
        return ServedModel(self.classifier, None, self.version, reason)

    @property
    def has_verdict(self) -> bool:
        return self.state is not None

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.classifier.probabilities(pixels)

    def answer(self, pixels: np.ndarray) -> Answers:
        if self.state is None:
            return Answers(self.probabilities(pixels), version=self.version)
        probabilities, features = self.classifier.outputs(pixels)
        scores = verdict.digit_scores(self.state, probabilities, features, as_model_input(pixels))
        return Answers(probabilities, scores, self.state.threshold, self.version)


def as_served(model: Any) -> ServedModel:
    """A ServedModel as it is, or any classifier / Keras model without a verdict."""
    if isinstance(model, ServedModel):
        return model
    from pipeline.serving.classifier import as_classifier

    return ServedModel(as_classifier(model))

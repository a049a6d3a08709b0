"""The promotion decision, pure: a candidate's test accuracy against the champion's and a margin,
after a floor on the share of test digits its digit verdict accepts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_accuracy: float
    champion_accuracy: float | None
    margin: float

    @property
    def status(self) -> str:
        return "promoted" if self.promote else "rejected"


def decide_promotion(candidate_accuracy: float, champion_accuracy: float | None, margin: float,
                     digit_acceptance: float | None = None, min_digit_acceptance: float = 0.0) -> Decision:
    """Promote when there is no champion, or the candidate beats it by at least `margin`; never when
    its verdict accepts fewer than `min_digit_acceptance` of the test digits (None: it has no verdict)."""
    if digit_acceptance is not None and digit_acceptance < min_digit_acceptance - 1e-12:
        reason = (f"its digit check accepts only {digit_acceptance:.4f} of test digits, under "
                  f"promote.min_digit_acceptance {min_digit_acceptance}")
        return Decision(False, reason, candidate_accuracy, champion_accuracy, margin)
    if champion_accuracy is None:
        return Decision(True, "no champion yet", candidate_accuracy, None, margin)
    gain = candidate_accuracy - champion_accuracy
    if gain >= margin - 1e-12:
        reason = f"test accuracy {candidate_accuracy:.4f} beats champion {champion_accuracy:.4f} by {gain:+.4f} >= margin {margin}"
        return Decision(True, reason, candidate_accuracy, champion_accuracy, margin)
    reason = f"test accuracy {candidate_accuracy:.4f} vs champion {champion_accuracy:.4f}: gain {gain:+.4f} < margin {margin}"
    return Decision(False, reason, candidate_accuracy, champion_accuracy, margin)

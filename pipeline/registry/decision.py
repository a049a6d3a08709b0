"""The promotion decision, pure: a candidate's test accuracy against the champion's and a margin,
after a floor on the share of test digits its digit verdict accepts; within the margin, accuracy on
users' feedback holdout decides.

The rule (README, "Promotion"):
1. a candidate whose verdict accepts fewer than `min_digit_acceptance` of test digits is refused;
2. with no champion, it is promoted;
3. better on test by at least `margin`: promoted;
4. equal on test within the margin (neither better nor worse by `margin`), and better on the feedback
   holdout by at least `feedback_margin` (both scored on the same holdout): promoted;
5. otherwise refused.
"""

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
                     digit_acceptance: float | None = None, min_digit_acceptance: float = 0.0,
                     feedback: tuple[float, float] | None = None, feedback_margin: float = 0.0) -> Decision:
    """The rule above. `digit_acceptance`: None when the candidate has no verdict; `feedback`: the
    (candidate, champion) accuracies on the feedback holdout, None when it is too small to judge."""
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
    on_test = f"test accuracy {candidate_accuracy:.4f} vs champion {champion_accuracy:.4f}"
    if feedback is not None and gain > -margin + 1e-12:
        feedback_gain = feedback[0] - feedback[1]
        on_feedback = (f"feedback holdout {feedback[0]:.4f} vs {feedback[1]:.4f} ({feedback_gain:+.4f}, "
                       f"feedback_margin {feedback_margin})")
        if feedback_gain >= feedback_margin - 1e-12:
            return Decision(True, f"{on_test}, equal within margin {margin}; better on the {on_feedback}",
                            candidate_accuracy, champion_accuracy, margin)
        return Decision(False, f"{on_test}: gain {gain:+.4f} < margin {margin}, and not better on the {on_feedback}",
                        candidate_accuracy, champion_accuracy, margin)
    reason = f"{on_test}: gain {gain:+.4f} < margin {margin}"
    return Decision(False, reason, candidate_accuracy, champion_accuracy, margin)

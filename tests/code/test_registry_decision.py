import pytest

from pipeline.registry import decide_promotion, should_promote


def test_first_version_becomes_champion():
    decision = decide_promotion(0.9, None, margin=0.001)
    assert decision.promote and decision.reason == "no champion yet"


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "expected"),
    [(0.992, 0.990, 0.001, True), (0.9905, 0.990, 0.001, False), (0.991, 0.990, 0.001, True),
     (0.989, 0.990, 0.0, False), (0.990, 0.990, 0.0, True)],
)
def test_candidate_must_beat_champion_by_margin(candidate, champion, margin, expected):
    assert should_promote(candidate, champion, margin) is expected
    decision = decide_promotion(candidate, champion, margin)
    assert decision.status == ("promoted" if expected else "rejected")
    assert f"{champion:.4f}" in decision.reason

import pytest

from pipeline.registry.decision import decide_promotion


def test_first_version_becomes_champion():
    decision = decide_promotion(0.9, None, margin=0.001)
    assert decision.promote and decision.reason == "no champion yet"


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "expected"),
    [(0.992, 0.990, 0.001, True), (0.9905, 0.990, 0.001, False), (0.991, 0.990, 0.001, True),
     (0.989, 0.990, 0.0, False), (0.990, 0.990, 0.0, True)],
)
def test_candidate_must_beat_champion_by_margin(candidate, champion, margin, expected):
    decision = decide_promotion(candidate, champion, margin)
    assert decision.promote is expected
    assert decision.status == ("promoted" if expected else "rejected")
    assert f"{champion:.4f}" in decision.reason


def test_champion_uri_follows_the_registered_model_in_params(tmp_path, monkeypatch, repo_root):
    from pipeline.registry.store import champion_uri

    monkeypatch.chdir(tmp_path)
    assert champion_uri() == "models:/mnist-cnn@champion"  # no params.yaml here: the built-in name
    params = (repo_root / "params.yaml").read_text().replace("registered_model: mnist-cnn", "registered_model: digits")
    (tmp_path / "params.yaml").write_text(params)
    assert champion_uri() == "models:/digits@champion"


@pytest.mark.parametrize("champion", [None, 0.990])
def test_a_candidate_under_the_digit_acceptance_floor_is_refused_however_accurate(champion):
    decision = decide_promotion(0.999, champion, 0.0, digit_acceptance=0.985, min_digit_acceptance=0.99)
    assert not decision.promote
    assert decision.reason == "its digit check accepts only 0.9850 of test digits, under promote.min_digit_acceptance 0.99"


@pytest.mark.parametrize(("acceptance", "expected"), [(0.99, True), (0.996, True), (None, True), (0.9899, False)])
def test_the_floor_is_inclusive_and_a_version_without_a_verdict_passes(acceptance, expected):
    decision = decide_promotion(0.995, 0.990, 0.001, digit_acceptance=acceptance, min_digit_acceptance=0.99)
    assert decision.promote is expected


@pytest.mark.parametrize("candidate, champion, feedback, expected", [
    (0.9900, 0.9900, (0.90, 0.60), True),    # equal on test, far better on feedback
    (0.9897, 0.9900, (0.90, 0.60), True),    # within the margin below: still equal
    (0.9890, 0.9900, (0.90, 0.60), False),   # worse by more than the margin: feedback cannot make up for it
    (0.9900, 0.9900, (0.61, 0.60), False),   # better on feedback, but under feedback_margin
    (0.9900, 0.9900, (0.62, 0.60), True),    # exactly feedback_margin
    (0.9900, 0.9900, None, False),           # no feedback holdout to judge: the test rule alone
    (0.9910, 0.9900, (0.10, 0.90), True),    # better on test by the margin: promoted whatever the feedback
])
def test_within_the_margin_the_feedback_holdout_decides(candidate, champion, feedback, expected):
    decision = decide_promotion(candidate, champion, 0.0005, feedback=feedback, feedback_margin=0.02)
    assert decision.promote is expected, decision.reason
    if feedback is not None and candidate - champion < 0.0005 and candidate - champion > -0.0005:
        assert "feedback holdout" in decision.reason


def test_the_feedback_rule_never_passes_the_digit_acceptance_floor():
    decision = decide_promotion(0.99, 0.99, 0.0005, digit_acceptance=0.5, min_digit_acceptance=0.99,
                                feedback=(1.0, 0.0), feedback_margin=0.02)
    assert not decision.promote and "digit check" in decision.reason

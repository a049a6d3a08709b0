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

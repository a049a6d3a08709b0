"""Promotion, rollback and races against a real MLflow SQLite store with real logged Keras models."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest

from pipeline.registry import store as registry
from tests.helpers import make_recipe
from pipeline.core.errors import PipelineError
from tests.e2e.conftest import run

pytestmark = pytest.mark.slow
MODEL = "mnist-cnn"
DIGEST = "data-v1"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty embedded store in tmp_path, which is also the project root (for the lock file)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from pipeline.core.tracking import ensure_experiment

    ensure_experiment("mnist")
    return tmp_path


def register_version(accuracy: float, digest: str = DIGEST, **figures: str) -> str:
    """Log a small real Keras model in a run and register it with its test metrics (and the digit
    verdict's `figures`) as tags."""
    import mlflow
    import mlflow.keras

    from pipeline.core.export import HASH_TAGS, KERAS_FILE, model_requirements
    from pipeline.core.hashing import sha256_file
    from pipeline.core.model import build_model, model_signature

    model = build_model(make_recipe(conv_filters=[4], dense_units=0))
    with mlflow.start_run() as active:
        info = mlflow.keras.log_model(model, name="model", signature=model_signature(),
                                      pip_requirements=model_requirements())  # not inferred: ~10 s each
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri))  # the re-score checks the Keras file's hash
    version = registry.register(info.model_uri, MODEL, active.info.run_id,
                                {"test_accuracy": f"{accuracy:.6f}", "test_data_sha256": digest,
                                 HASH_TAGS[KERAS_FILE]: sha256_file(folder / KERAS_FILE), **figures})
    return str(version.version)


def champion() -> str | None:
    holder = registry.alias_version(registry.client(), MODEL, registry.CHAMPION)
    return None if holder is None else str(holder.version)


def no_rescoring(uri):
    raise AssertionError(f"{uri} should not be re-scored: its tags match the test data")


def test_worse_is_never_promoted_better_is_and_rollback_restores(store):
    first = register_version(0.950)
    assert registry.promote(MODEL, first, 0.001, DIGEST, no_rescoring).promote
    assert champion() == first

    worse = register_version(0.949)
    decision = registry.promote(MODEL, worse, 0.001, DIGEST, no_rescoring)
    assert not decision.promote and champion() == first
    tags = registry.client().get_model_version(MODEL, worse).tags
    assert tags["validation_status"] == "rejected"
    assert tags["compared_champion_accuracy"] == "0.950000" and tags["compared_champion_version"] == first
    assert str(registry.alias_version(registry.client(), MODEL, registry.CHALLENGER).version) == worse

    within_margin = register_version(0.9505)
    assert not registry.promote(MODEL, within_margin, 0.001, DIGEST, no_rescoring).promote

    better = register_version(0.960)
    assert registry.promote(MODEL, better, 0.001, DIGEST, no_rescoring).promote
    assert champion() == better
    assert registry.client().get_model_version(MODEL, better).tags["validation_status"] == "promoted"

    moved_from, moved_to = registry.rollback_champion(registry.client(), MODEL)
    assert (moved_from, moved_to) == (better, first) and champion() == first
    with pytest.raises(PipelineError, match="first champion; nothing to roll back"):
        registry.rollback_champion(registry.client(), MODEL)

    rows = registry.version_rows(MODEL)
    assert [row["version"] for row in rows] == [better, within_margin, worse, first]
    assert rows[-1]["aliases"] == "champion"


def test_champion_is_rescored_when_test_data_changed(store):
    first = register_version(0.990, digest="old-data")
    registry.promote(MODEL, first, 0.0, "old-data", no_rescoring)
    scored = []

    def score(uri):
        scored.append(uri)
        return 0.900  # the champion does worse on the new test data

    candidate = register_version(0.950, digest="new-data")
    assert registry.promote(MODEL, candidate, 0.001, "new-data", score).promote
    assert scored == [f"models:/{MODEL}/{first}"] and champion() == candidate


def test_failure_while_deciding_keeps_the_champion(store):
    first = register_version(0.950, digest="old-data")
    registry.promote(MODEL, first, 0.0, "old-data", no_rescoring)
    candidate = register_version(0.999, digest="new-data")

    def broken_score(uri):
        raise OSError("model files unreadable")

    with pytest.raises(OSError):
        registry.promote(MODEL, candidate, 0.0, "new-data", broken_score)
    assert champion() == first


def _promote_in_process(tracking_uri: str, root: str, version: str, barrier) -> None:
    import os

    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    barrier.wait()
    registry.promote(MODEL, version, 0.001, DIGEST, no_rescoring)


def test_racing_promotions_leave_exactly_the_best_champion(store):
    import os

    registry.promote(MODEL, register_version(0.970), 0.001, DIGEST, no_rescoring)
    good, best = register_version(0.980), register_version(0.990)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_promote_in_process, args=(os.environ["MLFLOW_TRACKING_URI"], str(store), v, barrier))
               for v in (good, best)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert champion() == best


def test_promote_and_rollback_commands(store, repo_root):
    first = register_version(0.95)
    registry.promote(MODEL, first, 0.0, DIGEST, no_rescoring)
    second = register_version(0.97)
    registry.promote(MODEL, second, 0.0, DIGEST, no_rescoring)
    (store / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    import numpy as np

    from pipeline.core.data import Split, save_split

    rng = np.random.default_rng(0)
    (store / "data" / "prepared").mkdir(parents=True)
    save_split(Split(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), (np.arange(50) % 10).astype(np.uint8)),
               store / "data" / "prepared" / "test.npz")
    listed = run([sys.executable, "-m", "pipeline", "registry"], store).stdout
    assert "champion" in listed and "0.970000" in listed
    rolled = run([sys.executable, "-m", "pipeline", "rollback"], store)
    assert f"from v{second} to v{first}" in rolled.stdout and champion() == first
    missing = run([sys.executable, "-m", "pipeline", "promote", "--version", "99"], store, check=False)
    assert missing.returncode == 2 and "has no version 99" in missing.stderr
    typo = run([sys.executable, "-m", "pipeline", "promote", "--version", "abc"], store, check=False)
    assert typo.returncode == 2 and "--version: 'abc' is not a number" in typo.stderr  # a typo, not the store
    assert "tracking store" not in typo.stderr and champion() == first
    forced = run([sys.executable, "-m", "pipeline", "promote", "--version", second, "--force"], store)
    assert f"v{second}: promoted" in forced.stdout and champion() == second


def test_a_candidate_accepting_too_few_digits_is_refused_and_both_verdicts_are_recorded(store):
    from pipeline.core.verdict import ACCEPTANCE_TAG, REJECTION_TAG

    first = register_version(0.990, **{ACCEPTANCE_TAG: "0.995000", REJECTION_TAG: "0.800000"})
    assert registry.promote(MODEL, first, 0.001, DIGEST, no_rescoring, min_digit_acceptance=0.99).promote
    eager = register_version(0.999, **{ACCEPTANCE_TAG: "0.980000", REJECTION_TAG: "0.950000"})
    decision = registry.promote(MODEL, eager, 0.001, DIGEST, no_rescoring, min_digit_acceptance=0.99)
    assert not decision.promote and "under promote.min_digit_acceptance 0.99" in decision.reason
    assert champion() == first
    tags = registry.client().get_model_version(MODEL, eager).tags
    assert tags["compared_candidate_digit_acceptance"] == "0.980000"
    assert tags["compared_champion_digit_acceptance"] == "0.995000"
    assert tags["compared_candidate_nondigits_rejected"] == "0.950000"
    assert tags["compared_champion_nondigits_rejected"] == "0.800000"
    rows = {row["version"]: row for row in registry.version_rows(MODEL)}
    assert (rows[eager]["digits_accepted"], rows[eager]["nondigits_rejected"]) == ("0.980000", "0.950000")
    assert rows[eager]["status"] == "rejected"

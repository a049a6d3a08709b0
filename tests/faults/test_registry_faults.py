"""Store errors during promotion and rollback: one line, a non-zero exit, and champion, challenger and
history exactly as they were. A real SQLite registry; the client fails at its Nth call, for every N."""

from __future__ import annotations

import pytest

from pipeline.registry import store as registry
from pipeline.core.errors import PipelineError

MODEL = "mnist-cnn"
DIGEST = "test-data"


class FailingClient:
    """A real MlflowClient that raises a store error ("database is locked") at its `fail_at`-th call."""

    def __init__(self, real, fail_at: int):
        self.real, self.fail_at, self.calls = real, fail_at, 0

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            self.calls += 1
            if self.calls == self.fail_at:
                raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="INTERNAL_ERROR")
            return method(*args, **kwargs)

        return call


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A registry with v1 (champion, 0.95) and v2 (0.97, not yet promoted)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)  # mlflow.set_registry_uri exports it: never inherit another test's
    monkeypatch.chdir(tmp_path)  # the promotion lock lives in ./mlruns
    real = MlflowClient(tracking_uri=uri, registry_uri=uri)
    real.create_registered_model(MODEL)
    for accuracy in ("0.950000", "0.970000"):
        real.create_model_version(MODEL, source=str(tmp_path), tags={"test_accuracy": accuracy, "test_data_sha256": DIGEST})
    registry.promote(MODEL, "1", 0.0, DIGEST, never_rescore)
    return real


def never_rescore(uri):
    raise AssertionError("the tags hold the accuracies on this test data")


def state(real) -> tuple:
    model = real.get_registered_model(MODEL)
    return {alias: str(version) for alias, version in model.aliases.items()}, model.tags.get(registry.CHAMPION_HISTORY_TAG)


def test_a_store_error_at_any_promotion_call_changes_nothing(store, monkeypatch):
    before = state(store)
    assert before == ({"champion": "1", "challenger": "1"}, "1")
    fail_at = 1
    while True:
        failing = FailingClient(store, fail_at)
        monkeypatch.setattr(registry, "client", lambda: failing)
        try:
            decision = registry.promote(MODEL, "2", 0.0, DIGEST, never_rescore)
        except PipelineError as error:
            assert "database is locked" in str(error) and "\n" not in str(error), fail_at
            assert state(store) == before, f"a failure at call {fail_at} changed the aliases or history"
            fail_at += 1
            continue
        break
    assert fail_at > 4  # every read and write of the promotion failed once
    assert decision.promote and state(store) == ({"champion": "2", "challenger": "2"}, "1,2")


def test_a_store_error_at_any_rollback_call_changes_nothing(store, monkeypatch):
    registry.promote(MODEL, "2", 0.0, DIGEST, never_rescore)
    before = state(store)
    fail_at = 1
    while True:
        try:
            result = registry.rollback_champion(FailingClient(store, fail_at), MODEL)
        except PipelineError as error:
            assert "database is locked" in str(error) and "\n" not in str(error), (fail_at, str(error), state(store))
            aliases, history = state(store)
            if (aliases, history) != before:  # only the last write (the rolled-back tag) may remain to retry
                assert aliases["champion"] == "1" and history == "1", fail_at
                break
            fail_at += 1
            continue
        break
    assert state(store)[0]["champion"] == "1" or result == ("2", "1")


def test_an_unreadable_champion_is_never_taken_for_no_champion(store, monkeypatch):
    """Only "not found" means there is no champion: a locked database must not crown the candidate."""
    from mlflow.exceptions import MlflowException

    def locked(*args, **kwargs):
        raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(store, "get_model_version_by_alias", locked)
    with pytest.raises(PipelineError, match="reading the champion alias"):
        registry.alias_version(store, MODEL, registry.CHAMPION)
    from mlflow import MlflowClient

    empty = MlflowClient(tracking_uri=store._tracking_client.tracking_uri,
                         registry_uri=store._tracking_client.tracking_uri)
    empty.create_registered_model("other")
    assert registry.alias_version(empty, "other", registry.CHAMPION) is None  # truly absent: None
    assert registry.alias_version(empty, "absent-model", registry.CHAMPION) is None

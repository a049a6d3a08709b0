import pytest

from pipeline.tuning.dashboard import storage_for_dashboard
from pipeline.core.errors import PipelineError
from pipeline.tuning.study import sqlite_file


def test_sqlite_paths_resolve_under_the_root_and_other_databases_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_file("sqlite:///studies/optuna.db") == tmp_path / "studies" / "optuna.db"
    assert sqlite_file("sqlite:////srv/optuna.db").as_posix() == "/srv/optuna.db"
    assert sqlite_file("postgresql+psycopg://postgres@127.0.0.1/test") is None
    assert storage_for_dashboard("postgresql+psycopg://postgres@127.0.0.1/test") == \
        "postgresql+psycopg://postgres@127.0.0.1/test"


def test_a_missing_study_file_is_an_error_and_nothing_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"no Optuna study database at .*studies/optuna.db.*dvc repro -f tune"):
        storage_for_dashboard("sqlite:///studies/optuna.db")
    assert not (tmp_path / "studies").exists()


def test_an_existing_study_file_opens_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "optuna.db").write_bytes(b"")
    assert storage_for_dashboard("sqlite:///studies/optuna.db") == f"sqlite:///{tmp_path}/studies/optuna.db"

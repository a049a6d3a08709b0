import pytest

from pipeline.dashboard import sqlite_path, storage_for_dashboard
from pipeline.errors import PipelineError


def test_sqlite_paths_resolve_under_the_root_and_other_databases_pass_through(tmp_path):
    assert sqlite_path("sqlite:///studies/optuna.db", tmp_path) == tmp_path / "studies" / "optuna.db"
    assert sqlite_path("sqlite:////srv/optuna.db", tmp_path).as_posix() == "/srv/optuna.db"
    assert sqlite_path("postgresql+psycopg://postgres@127.0.0.1/test", tmp_path) is None
    assert storage_for_dashboard("postgresql+psycopg://postgres@127.0.0.1/test", tmp_path) == \
        "postgresql+psycopg://postgres@127.0.0.1/test"


def test_a_missing_study_file_is_an_error_and_nothing_is_created(tmp_path):
    with pytest.raises(PipelineError, match=r"no Optuna study database at .*studies/optuna.db.*dvc repro -f tune"):
        storage_for_dashboard("sqlite:///studies/optuna.db", tmp_path)
    assert not (tmp_path / "studies").exists()


def test_an_existing_study_file_opens_by_its_absolute_path(tmp_path):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "optuna.db").write_bytes(b"")
    assert storage_for_dashboard("sqlite:///studies/optuna.db", tmp_path) == f"sqlite:///{tmp_path}/studies/optuna.db"

import json
from pathlib import Path

import pytest

from pipeline.core.tracking import (
    RUN_KIND_TAG,
    SYSTEM_METRICS_INTERVAL_ENV,
    SYSTEM_METRICS_INTERVAL_S,
    log_split,
    log_table,
    provenance_tags,
    run_tags,
    sample_system_metrics,
)


def test_run_tags_carry_the_dvc_experiment_only_inside_one(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    plain = run_tags("train", "abc123")
    assert plain[RUN_KIND_TAG] == "train" and plain["params_hash"] == "abc123"
    assert "dvc_exp_name" not in plain and "dvc_exp_baseline_rev" not in plain

    monkeypatch.setenv("DVC_EXP_NAME", "wider-net")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    tagged = run_tags("train", "abc123")
    assert tagged["dvc_exp_name"] == "wider-net" and tagged["dvc_exp_baseline_rev"] == "f" * 40


def test_provenance_tags_rename_the_commit_and_skip_what_is_absent():
    tags = {"mlflow.source.git.commit": "c0ffee", "params_hash": "abc123", "dvc_exp_name": "wider-net",
            "dvc_exp_baseline_rev": "", RUN_KIND_TAG: "train", "mlflow.user": "someone"}
    assert provenance_tags(tags) == {"git_commit": "c0ffee", "params_hash": "abc123", "dvc_exp_name": "wider-net"}
    assert provenance_tags({}) == {}


# ---- what runs record, on a real SQLite store in tmp_path ----------------------------------------------


@pytest.fixture
def active_run(tmp_path):
    """A run of a fresh store in tmp_path, active while the test runs."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri()))
        with mlflow.start_run() as run:
            yield run
    finally:
        mlflow.set_tracking_uri(None)


def test_a_split_is_a_dataset_input_with_its_content_digest_file_and_context(active_run, tmp_path):
    import mlflow
    import numpy as np

    from pipeline.core.data import Split, save_split, split_digest

    split = Split(np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28), np.arange(5, dtype=np.uint8))
    save_split(split, tmp_path / "test.npz")
    log_split(split, tmp_path / "test.npz", "mnist-test", "testing")
    log_split(split, tmp_path / "test.npz", "mnist-test", "testing")  # an evaluation run again: no second row
    (logged,) = mlflow.MlflowClient().get_run(active_run.info.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("mnist-test", split_digest(split))
    assert json.loads(logged.dataset.source)["uri"] == str(tmp_path / "test.npz")
    assert {tag.key: tag.value for tag in logged.tags}["mlflow.data.context"] == "testing"


def test_a_table_logged_again_replaces_the_first_instead_of_growing(active_run, tmp_path):
    import mlflow

    log_table({"digit": [0, 1], "f1": [0.5, 0.6]}, "per_class.json")
    log_table({"digit": [0, 1], "f1": [0.7, 0.8]}, "per_class.json")
    path = mlflow.artifacts.download_artifacts(run_id=active_run.info.run_id, artifact_path="per_class.json",
                                               dst_path=str(tmp_path / "download"))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["digit", "f1"] and table["data"] == [[0, 0.7], [1, 0.8]]
    logged = json.loads(mlflow.get_run(active_run.info.run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "per_class.json", "type": "table"}]  # the UI shows it as a table


def test_system_metrics_sample_every_few_seconds_unless_the_user_says_otherwise(monkeypatch):
    import os

    monkeypatch.setenv(SYSTEM_METRICS_INTERVAL_ENV, "")
    sample_system_metrics()
    assert float(os.environ[SYSTEM_METRICS_INTERVAL_ENV]) == SYSTEM_METRICS_INTERVAL_S < 10
    monkeypatch.setenv(SYSTEM_METRICS_INTERVAL_ENV, "30")
    sample_system_metrics()
    assert os.environ[SYSTEM_METRICS_INTERVAL_ENV] == "30"

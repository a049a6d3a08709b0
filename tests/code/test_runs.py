"""`python -m pipeline runs`: the comparison table, and the command on a real MLflow store."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.__main__ import main as pipeline_main
from pipeline.core.errors import PipelineError
from pipeline.commands.runs import format_runs, runs_table


def search_rows(*rows: dict) -> pd.DataFrame:
    """Rows shaped like `mlflow.search_runs(output_format="pandas")`: params as strings, metrics as floats."""
    frame = pd.DataFrame(rows)
    frame["start_time"] = pd.to_datetime(frame["start_time"], utc=True)
    return frame


RUNS = search_rows(
    {"run_id": "aaaaaaaa1111", "start_time": "2025-01-01 10:00", "params.preset": "fast",
     "params.recipe.batch_size": "128", "params.recipe.learning_rate": "0.003", "params.recipe.dropout": "0.3",
     "metrics.epochs_run": 12.0, "metrics.test_accuracy": 0.9931, "metrics.handwriting_accuracy": 0.91,
     "tags.registered_version": "1"},
    {"run_id": "bbbbbbbb2222", "start_time": "2025-01-03 10:00", "params.preset": "reference",
     "params.recipe.batch_size": "64", "params.recipe.learning_rate": "0.001", "params.recipe.dropout": "0.25",
     "metrics.epochs_run": 30.0, "metrics.test_accuracy": 0.9952, "metrics.handwriting_accuracy": 0.95,
     "tags.registered_version": "2"},
    {"run_id": "cccccccc3333", "start_time": "2025-01-02 10:00", "params.preset": "fast",  # never evaluated
     "params.recipe.batch_size": "256", "params.recipe.learning_rate": "0.005", "params.recipe.dropout": "0.2",
     "metrics.epochs_run": 3.0, "metrics.test_accuracy": np.nan, "metrics.handwriting_accuracy": np.nan,
     "tags.registered_version": None},
)
ALIASES = {"2": "challenger,champion"}


def test_newest_first_with_typed_values_and_aliases():
    table = runs_table(RUNS, ALIASES)
    assert table["run"].tolist() == ["bbbbbbbb2222", "cccccccc3333", "aaaaaaaa1111"]
    assert table["batch_size"].tolist() == [64, 256, 128]  # numbers, not the strings MLflow keeps params as
    assert table["aliases"].tolist()[0] == "challenger,champion" and table["aliases"].isna().tolist()[1:] == [True, True]


def test_sort_puts_the_highest_first_and_missing_values_last_and_top_cuts():
    assert runs_table(RUNS, ALIASES, sort="test_accuracy")["run"].tolist() == ["bbbbbbbb2222", "aaaaaaaa1111", "cccccccc3333"]
    assert runs_table(RUNS, ALIASES, sort="learning_rate", top=1)["run"].tolist() == ["cccccccc3333"]
    assert runs_table(RUNS, ALIASES, sort="preset")["preset"].tolist() == ["fast", "fast", "reference"]  # text: A-Z
    assert runs_table(RUNS, ALIASES, sort="preset")["run"].tolist()[:2] == ["cccccccc3333", "aaaaaaaa1111"]  # ties: newest first
    with pytest.raises(PipelineError, match="cannot sort by 'accuracy'; choose one of started, run, preset"):
        runs_table(RUNS, ALIASES, sort="accuracy")


def test_format_shows_short_ids_rounded_scores_and_dashes_for_missing_values():
    lines = format_runs(runs_table(RUNS, ALIASES)).splitlines()
    assert lines[0].split() == ["started", "run", "preset", "epochs_run", "batch_size", "learning_rate", "dropout",
                                "test_accuracy", "handwriting_accuracy", "version", "aliases"]
    newest = lines[1].split()
    assert newest[2:] == ["bbbbbbbb", "reference", "30", "64", "0.001", "0.25", "0.9952", "0.9500", "2",
                          "challenger,champion"]
    assert lines[2].split()[-4:] == ["-", "-", "-", "-"]  # not evaluated, not registered
    assert len(lines) == 4


def test_no_runs_at_all_is_an_empty_table():
    assert format_runs(runs_table(pd.DataFrame(), {})) == "(no training runs)"  # search_runs' empty frame has no columns


# ---- the command on a real store ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch, repo_root):
    """A project folder (params.yaml only) whose MLflow store is a fresh SQLite file in tmp_path."""
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield uri
    mlflow.set_tracking_uri(None)  # configure_tracking set it for this process
    mlflow.set_registry_uri(None)


def log_training_run(client, experiment_id: str, kind: str, preset: str, test_accuracy: float, version: str | None = None) -> str:
    run = client.create_run(experiment_id, tags={"mnist.run_kind": kind, **({"registered_version": version} if version else {})})
    for key, value in {"preset": preset, "recipe.batch_size": "128", "recipe.learning_rate": "0.001",
                       "recipe.dropout": "0.25"}.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "epochs_run", 2)
    client.log_metric(run.info.run_id, "test_accuracy", test_accuracy)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_runs_command_compares_the_training_runs_of_the_store(store, tmp_path, capsys):
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    experiment_id = client.create_experiment("mnist", artifact_location=(tmp_path / "artifacts").as_uri())
    better = log_training_run(client, experiment_id, "train", "reference", 0.97, version="1")
    newer = log_training_run(client, experiment_id, "train", "fast", 0.95)
    log_training_run(client, experiment_id, "tune-trial", "fast", 0.99)  # a trial: not a training run
    client.create_registered_model("mnist-cnn")
    client.create_model_version("mnist-cnn", source=(tmp_path / "model").as_uri(), run_id=better)
    client.set_registered_model_alias("mnist-cnn", "champion", "1")

    assert pipeline_main(["runs"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[2] for row in rows] == [newer[:8], better[:8]]  # newest first, no trial
    assert pipeline_main(["runs", "--sort", "test_accuracy", "--top", "1"]) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[2:5] == [better[:8], "reference", "2"] and row.split()[-2:] == ["1", "champion"]


def test_runs_without_a_store_is_one_error_line_and_creates_none(store, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline_main(["runs"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: no MLflow store at {tmp_path / 'mlflow.db'} yet") and "\n" not in error
    assert not (tmp_path / "mlflow.db").exists()


def test_runs_without_the_experiment_is_one_error_line(store, capsys):
    mlflow.MlflowClient(tracking_uri=store).create_experiment("something-else")
    with pytest.raises(SystemExit) as exit_info:
        pipeline_main(["runs"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's log of creating the store above
    assert last == f"error: no experiment 'mnist' in the MLflow store {store} yet; run `dvc repro` to train"

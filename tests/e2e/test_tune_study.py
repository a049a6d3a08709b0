"""Optuna studies with real storage: resume after SIGKILL, pruning, --more, and optuna-dashboard."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from tests.conftest import copy_project, free_port
from tests.e2e.conftest import project_env, run, tiny_params

pytestmark = pytest.mark.slow


def current_study_name(project) -> str:
    from pipeline.core.config import load_params
    from pipeline.tuning.study import study_name

    return study_name(load_params(project / "params.yaml"))


def study_states(project) -> list[str]:
    """Trial states in number order, read through a read-only SQLite connection (never a writer
    competing with the tuning process for the lock)."""
    import sqlite3

    database = project / "studies" / "optuna.db"
    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
            rows = db.execute(
                "select t.state from trials t join studies s on t.study_id = s.study_id "
                "where s.study_name = ? order by t.number", (current_study_name(project),)).fetchall()
    except sqlite3.OperationalError:
        return []  # tables not created yet
    return [state for (state,) in rows]


def prepared_project(tmp_path_factory, **overrides):
    project = copy_project(tmp_path_factory.mktemp("tune"))
    tiny_params(project / "params.yaml", **overrides)
    for stage in ("pipeline.fetch", "pipeline.preprocess"):
        run([sys.executable, "-m", stage], project)
    return project


@pytest.fixture(scope="module")
def resumed_project(tmp_path_factory):
    """A study of 3 trials whose process is SIGKILLed in trial 1, then resumed by the tune stage."""
    project = prepared_project(tmp_path_factory, **{
        "tune.n_trials": 3, "tune.epochs": 3, "tune.train_images": 1500, "tune.pruner": "none",
        "tune.heartbeat_interval_s": 1, "tune.grace_period_s": 3})
    log = (project / "tune.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.tune"], cwd=project, env=project_env(project),
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and study_states(project)[1:2] != ["RUNNING"]:
        assert worker.poll() is None, f"tuning ended before it could be killed: {(project / 'tune.log').read_text()[-1500:]}"
        time.sleep(0.5)
    time.sleep(2)  # well inside trial 1
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = study_states(project)
    time.sleep(4)  # past the grace period: the killed trial's heartbeat is stale
    resumed = run([sys.executable, "-m", "pipeline.tune"], project)
    return project, killed, resumed


def test_kill_leaves_one_running_trial(resumed_project):
    _, killed, _ = resumed_project
    assert killed == ["COMPLETE", "RUNNING"]


def test_resume_fails_the_killed_trial_and_reaches_the_budget(resumed_project):
    project, _, resumed = resumed_project
    states = study_states(project)
    assert states[0] == "COMPLETE"  # kept, not re-run
    assert states[1] == "FAIL"  # the killed trial, failed by its stale heartbeat
    assert states.count("COMPLETE") + states.count("PRUNED") == 3
    study = optuna.load_study(study_name=current_study_name(project), storage=f"sqlite:///{project / 'studies' / 'optuna.db'}")
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == study.trials[1].params  # the killed trial retried
    summary = json.loads((project / "metrics" / "tune.json").read_text())
    assert summary["trials"]["FAIL"] == 1
    assert study.metric_names == ["val_accuracy"]  # optuna-dashboard's axis names the objective


def test_killed_trial_run_is_closed_in_mlflow(resumed_project):
    import mlflow

    project, _, _ = resumed_project
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    study = optuna.load_study(study_name=current_study_name(project), storage=f"sqlite:///{project / 'studies' / 'optuna.db'}")
    run_id = study.trials[1].user_attrs["mlflow_run_id"]
    killed_run = mlflow.MlflowClient().get_run(run_id)
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["optuna.state"] == "FAIL"


def test_rerun_with_full_study_adds_no_trials_and_more_adds(resumed_project):
    project, _, _ = resumed_project
    before = len(study_states(project))
    result = run([sys.executable, "-m", "pipeline.tune"], project)
    assert "nothing to run" in result.stderr
    assert len(study_states(project)) == before
    run([sys.executable, "-m", "pipeline", "tune", "--more", "1"], project)
    states = study_states(project)
    assert states.count("COMPLETE") + states.count("PRUNED") == 4


def test_optuna_dashboard_reads_the_study(resumed_project):
    """`python -m pipeline dashboard` serves optuna-dashboard on the study storage of params.yaml."""
    project, _, _ = resumed_project
    port = free_port()
    dashboard = subprocess.Popen([sys.executable, "-m", "pipeline", "dashboard", "--port", str(port)],
                                 cwd=project, env=project_env(project), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        studies = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer"
        (summary,) = [s for s in studies if s["study_name"] == current_study_name(project)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as response:
            detail = json.loads(response.read())
        assert len(detail["trials"]) == len(study_states(project))
        assert {t["state"] for t in detail["trials"]} >= {"Complete", "Fail"}
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=20)


def test_a_bad_trial_is_pruned(tmp_path_factory):
    """Trial 0 learns; trial 1's divergent learning rate is cut by successive halving at its first rung."""
    project = prepared_project(tmp_path_factory, **{
        "tune.pruner": "successive_halving", "tune.epochs": 3, "tune.enqueue_preset": False,
        "tune.space": {"learning_rate": {"low": 0.0001, "high": 1.0, "log": True}}})
    (project / "studies").mkdir()
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    study = optuna.create_study(study_name=current_study_name(project), storage=storage, direction="maximize")
    study.enqueue_trial({"learning_rate": 0.001})
    study.enqueue_trial({"learning_rate": 1.0})  # (presets allow adam and adamw only, no longer sgd)
    run([sys.executable, "-m", "pipeline.tune"], project)
    states = study_states(project)
    assert states == ["COMPLETE", "PRUNED"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    pruned = mlflow.search_runs(experiment_names=["mnist"], filter_string="tags.`optuna.state` = 'PRUNED'")
    assert len(pruned) == 1 and int(pruned.iloc[0]["tags.epochs_run"]) < 3  # cut before its last epoch
    assert pruned.iloc[0]["status"] == "FINISHED"  # not shown as a failed run


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruned_trial_runs_end_finished_and_failed_ones_failed(tmp_path, monkeypatch):
    """Pruning is Optuna's decision, not a failure: a pruned trial's MLflow run ends FINISHED (tagged
    PRUNED), while a trial that raises ends FAILED. Real Keras trials on a few random images, an
    in-memory study and a SQLite MLflow store in tmp_path."""
    import mlflow
    import numpy as np

    from pipeline.tuning.objective import Objective
    from tests.helpers import params_with

    params = params_with({"train": {"preset": "reference"},
                          "tune": {"base_preset": "reference", "epochs": 2, "space": {"dropout": {"low": 0.0, "high": 0.3}}}})
    rng = np.random.default_rng(0)
    data = {"x_train": rng.integers(0, 256, (64, 28, 28, 1)).astype(np.float32), "y_train": rng.integers(0, 10, 64),
            "x_val": rng.integers(0, 256, (32, 28, 28, 1)).astype(np.float32), "y_val": rng.integers(0, 10, 32)}
    broken = {**data, "x_val": data["x_val"][:, :20]}  # images of the wrong size: the trial raises
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.create_experiment("trials", artifact_location=(tmp_path / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment_id)
        study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
        with mlflow.start_run(run_name="study") as parent:  # trials nest in it, as in a tuning session
            study.optimize(Objective(params, data, parent.info.run_id), n_trials=1)
            assert mlflow.active_run().info.run_id == parent.info.run_id  # the pruned trial ended its own run only
            study.optimize(Objective(params, broken, parent.info.run_id), n_trials=1, catch=(Exception,))
        runs = {run.data.tags.get("optuna.trial", "parent"): run
                for run in mlflow.search_runs([experiment_id], output_format="list")}
    finally:
        mlflow.set_tracking_uri(None)
    assert [trial.state.name for trial in study.trials] == ["PRUNED", "FAIL"]
    assert runs["parent"].info.status == "FINISHED"
    assert runs["0"].data.tags["mlflow.parentRunId"] == runs["1"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (runs["0"].info.status, runs["0"].data.tags["optuna.state"]) == ("FINISHED", "PRUNED")
    assert runs["0"].data.tags["epochs_run"] == "1"
    assert (runs["1"].info.status, runs["1"].data.tags["optuna.state"]) == ("FAILED", "FAIL")


def test_changing_the_search_space_starts_a_new_study(resumed_project):
    import yaml

    project, _, _ = resumed_project
    before = current_study_name(project)
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["tune"]["space"]["dropout"] = {"low": 0.25, "high": 0.45}
    try:
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        after = current_study_name(project)
    finally:
        (project / "params.yaml").write_text(original)
    assert before.startswith("mnist-cnn-") and after.startswith("mnist-cnn-") and before != after
    assert current_study_name(project) == before


def test_unreachable_storage_is_one_clear_line(tmp_path):
    project = copy_project(tmp_path / "project")  # the storage is opened before any data is read
    tiny_params(project / "params.yaml", **{"tune.storage": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    result = run([sys.executable, "-m", "pipeline.tune"], project, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Optuna storage postgresql+psycopg://nobody@127.0.0.1:1/none is unreachable")

"""Two tuning workers on one PostgreSQL study, logging to an MLflow server on PostgreSQL; one is killed."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest

from tests.conftest import copy_project
from tests.faults.conftest import start_two_tuning_workers

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def project(tmp_path):
    root = copy_project(tmp_path / "project")
    return root


def test_two_workers_share_a_study_and_survive_a_killed_worker(project, postgres_database, mlflow_server, tmp_path):
    import psycopg

    study_db, tracking_db = postgres_database(), postgres_database()  # both use alembic_version: keep apart
    tracking_uri = mlflow_server(tracking_db)
    launcher, name, _ = start_two_tuning_workers(project, study_db, tracking_uri, **{
        "tune.heartbeat_interval_s": 1, "tune.grace_period_s": 4})
    storage = optuna.storages.RDBStorage(study_db)
    victim = None
    deadline = time.monotonic() + 400
    while victim is None and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            running = [t for t in study.get_trials(deepcopy=False)
                       if t.state.name == "RUNNING" and t.number >= 1 and "worker" in t.user_attrs]
        except KeyError:
            running = []
        if running:
            victim = running[0]
        else:
            time.sleep(0.5)
    assert victim is not None, "no trial started"
    time.sleep(2)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    states = {t.number: t.state.name for t in trials}
    assert states[victim.number] == "FAIL"  # failed by its stale heartbeat, by the surviving worker
    assert sum(state in ("COMPLETE", "PRUNED") for state in states.values()) >= 4
    assert any(t.system_attrs.get("failed_trial") == victim.number for t in trials)  # and retried
    assert len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}) == 2

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("mnist")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`mnist.run_kind` = 'tune-study'")
    children = client.search_runs([experiment.experiment_id], "tags.`mnist.run_kind` = 'tune-trial'")
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {t.user_attrs["mlflow_run_id"] for t in trials if "mlflow_run_id" in t.user_attrs} == {
        c.info.run_id for c in children}
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "figures")]
    assert "figures/optimization_history.png" in artifacts  # proxied to the server's artifact folder
    assert any((tmp_path / "artifacts").rglob("optimization_history.png"))
    with psycopg.connect(study_db.replace("+psycopg", "")) as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == len(trials)

"""The study's storage fails for a while: calls are retried, heartbeats go on, no trial or worker is lost.

The outage test puts a TCP proxy of its own between the tuning workers and PostgreSQL and cuts it for
20 s (the PostgreSQL service itself is never touched)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import optuna
import pytest

from pipeline.tuning.study import make_storage
from tests.conftest import copy_project, free_port
from tests.faults.conftest import CuttableProxy, start_two_tuning_workers
from tests.helpers import params_with

OUTAGE_S = 20


def refused(*args, **kwargs):
    import sqlalchemy.exc

    raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


class Flaky:
    """Stands in for a storage's session factory: the first `failures` sessions fail as a lost server."""

    def __init__(self, real, failures: int):
        self.real, self.failures = real, failures

    def __call__(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            refused()
        return self.real(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def storage(tmp_path):
    tune = params_with({"tune": {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "heartbeat_interval_s": 1,
                                 "grace_period_s": 2}}).tune
    return make_storage(tune)


def test_transient_storage_errors_are_retried_and_others_are_not(storage, caplog):
    import sqlalchemy.exc

    study = optuna.create_study(study_name="s", storage=storage)
    storage.scoped_session = Flaky(storage.scoped_session, failures=3)
    with caplog.at_level(logging.WARNING, logger="pipeline.tuning"):
        trial_id = storage.create_new_trial(study._study_id)  # three refused connections, then through
    assert storage.get_trial(trial_id).number == 0 and storage.scoped_session.failures == 0
    assert "retrying for up to" in caplog.text and "succeeded after 3 retries" in caplog.text
    with pytest.raises(KeyError):  # a study that does not exist is an answer, not an outage
        storage.get_study_id_from_name("absent")
    storage.retry_s = 1.0
    storage.scoped_session = Flaky(storage.scoped_session.real, failures=99)
    with pytest.raises(sqlalchemy.exc.OperationalError):  # an outage longer than retry_s is reported
        storage.get_trial(trial_id)


def test_a_finishing_write_whose_answer_was_lost_counts_as_done(storage):
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    study = optuna.create_study(study_name="s", storage=storage)
    trial_id = storage.create_new_trial(study._study_id)
    committed = RDBStorage.set_trial_state_values

    def commit_then_lose_the_answer(self, *args, **kwargs):
        committed(self, *args, **kwargs)
        RDBStorage.set_trial_state_values = committed
        refused()

    RDBStorage.set_trial_state_values = commit_then_lose_the_answer
    try:
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    finally:
        RDBStorage.set_trial_state_values = committed
    assert storage.get_trial(trial_id).state == TrialState.COMPLETE


def test_a_failed_heartbeat_does_not_stop_the_heartbeat_thread(storage, caplog):
    from optuna.storages._heartbeat import HeartbeatThread

    study = optuna.create_study(study_name="s", storage=storage)
    trial_id = storage.create_new_trial(study._study_id)
    storage.retry_s = 0.1
    storage.scoped_session = Flaky(storage.scoped_session, failures=2)
    beats = HeartbeatThread(trial_id, storage)
    with caplog.at_level(logging.WARNING, logger="pipeline.tuning"):
        beats.start()
        time.sleep(3.5)  # interval 1 s: two beats fail, the next ones get through
        beats.join()
    assert caplog.text.count("heartbeat not recorded") == 2
    assert storage.scoped_session.failures == 0 and not storage._get_stale_trial_ids(study._study_id)


# ---- a real outage between two tuning workers and PostgreSQL ----------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_a_storage_outage_mid_study_loses_no_trial_and_no_worker(tmp_path, postgres_database, mlflow_server):
    study_db, tracking_db = postgres_database(), postgres_database()
    server = urlsplit(study_db)
    proxy = CuttableProxy((server.hostname, server.port or 5432))
    through_proxy = study_db.replace(server.netloc, f"{server.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")
    tracking_uri = mlflow_server(tracking_db)  # MLflow reaches PostgreSQL directly: only the study's storage fails
    project = copy_project(tmp_path / "project")
    launcher, name, env = start_two_tuning_workers(project, through_proxy, tracking_uri, **{
        "tune.heartbeat_interval_s": 2, "tune.grace_period_s": OUTAGE_S + 10})
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True).start()
    direct = optuna.storages.RDBStorage(study_db)  # the test's own view, around the proxy
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "".join(output)[-3000:]
        try:
            trials = optuna.load_study(study_name=name, storage=direct).get_trials(deepcopy=False)
        except KeyError:
            trials = []
        if sum(t.state.name == "RUNNING" and "worker" in t.user_attrs for t in trials) == 2:
            break  # both workers are inside a trial
        time.sleep(0.3)
    else:
        pytest.fail("the two workers never ran trials at the same time")
    time.sleep(1)
    proxy.cut()
    cut_at = time.time()
    time.sleep(OUTAGE_S)
    proxy.restore()
    restored_at = time.time()
    assert launcher.wait(timeout=600) == 0, "".join(output)[-3000:]
    log = "".join(output)
    assert "retrying for up to" in log, log[-3000:]  # the outage did reach the workers
    assert "Traceback" not in log, log[-3000:]

    trials = optuna.load_study(study_name=name, storage=direct).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") >= 4 and set(states) == {"COMPLETE"}, states  # none failed, none left running
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.value is not None and set(t.params) == {"learning_rate", "dropout", "batch_size"} for t in trials)
    assert all(sorted(t.intermediate_values) == [0, 1, 2] for t in trials)  # every epoch's report is there
    finishing = {t.user_attrs["worker"] for t in trials if t.datetime_complete.timestamp() > restored_at}
    in_outage = {t.user_attrs["worker"] for t in trials if t.datetime_start.timestamp() < cut_at < t.datetime_complete.timestamp()}
    assert len(in_outage) == 2 and in_outage <= finishing  # both workers rode the outage out in their trial

    rerun = subprocess.run([sys.executable, "-m", "pipeline", "tune"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=300)  # the study resumes: complete, so nothing more to run
    assert rerun.returncode == 0 and "nothing to run" in rerun.stdout + rerun.stderr, rerun.stderr[-2000:]

"""Faults during training: SIGKILL mid-fit or mid-evaluate loses nothing and leaves nothing behind
(no run left RUNNING, no staging folder, prior outputs byte-identical until replaced); the same params
give the same metrics."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from tests.e2e.conftest import dvc, project_env
from tests.e2e.test_dvc_repro import mlflow_client

pytestmark = pytest.mark.slow


OUTPUT_FOLDERS = ("models", "metrics", "figures")


def output_digests(project) -> dict[str, str]:
    """sha256 of every file under the stages' output folders (staging folders included, so that a
    leftover shows up as a difference)."""
    import hashlib

    return {str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in OUTPUT_FOLDERS for path in sorted((project / folder).rglob("*")) if path.is_file()}


def staging_leftovers(project) -> list[str]:
    return [str(path) for folder in OUTPUT_FOLDERS for path in (project / folder).rglob(".staging-*")]


def running_runs(project) -> list[str]:
    client = mlflow_client(project)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return [run.info.run_id for run in client.search_runs(experiments, "attributes.status = 'RUNNING'")]


def versions_and_champion(project) -> tuple[int, str]:
    client = mlflow_client(project)
    return (len(client.search_model_versions("name='mnist-cnn'")),
            str(client.get_model_version_by_alias("mnist-cnn", "champion").version))


def test_sigkill_during_training_registers_nothing_and_next_repro_completes(tiny_project):
    import signal
    import subprocess
    import threading

    before = versions_and_champion(tiny_project)
    outputs_before = output_digests(tiny_project)
    params_path = tiny_project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["epochs"] = 3
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=tiny_project, env=project_env(tiny_project),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    training = threading.Event()

    def watch():
        for line in repro.stdout:
            if line.startswith("Epoch 2/3"):
                training.set()

    threading.Thread(target=watch, daemon=True).start()
    assert training.wait(timeout=600), "training never reached its second epoch"
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    assert versions_and_champion(tiny_project) == before  # nothing registered, champion untouched
    assert running_runs(tiny_project), "the killed training left no RUNNING run: the test did not kill it mid-run"
    after_kill = output_digests(tiny_project)
    assert {k: v for k, v in after_kill.items() if ".staging-" not in k} == outputs_before  # prior outputs intact
    result = dvc("repro", project=tiny_project)
    assert "Running stage 'train'" in result.stdout
    assert "Running stage 'tune'" not in result.stdout  # a final-training knob never re-runs the study
    count, _ = versions_and_champion(tiny_project)
    assert count == before[0] + 1
    assert running_runs(tiny_project) == [] and staging_leftovers(tiny_project) == []


def test_sigkill_during_evaluate_leaves_nothing_running_and_next_repro_completes(tiny_project):
    """Killed while evaluate has the training run open (seen in the store): the run is closed as KILLED
    by the next stage run, the outputs stay as they were until evaluate writes them again."""
    import signal
    import sqlite3
    import subprocess
    import time

    run_id = json.loads((tiny_project / "models" / "train_run.json").read_text())["run_id"]
    outputs_before = output_digests(tiny_project)
    before = versions_and_champion(tiny_project)
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", "evaluate"], cwd=tiny_project,
                             env=project_env(tiny_project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    database = tiny_project / "mlruns" / "mlflow.db"
    deadline = time.monotonic() + 600
    seen_running = False
    while time.monotonic() < deadline and repro.poll() is None and not seen_running:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        seen_running = bool(row) and row[0] == "RUNNING"
        time.sleep(0.02)
    assert seen_running, "evaluate never reopened the training run"
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    assert running_runs(tiny_project) == [run_id]
    assert versions_and_champion(tiny_project)[1] == before[1]  # the champion did not move
    assert {k: v for k, v in output_digests(tiny_project).items() if ".staging-" not in k} == outputs_before

    result = dvc("repro", "-f", "-s", "evaluate", project=tiny_project)  # the command again
    assert "Running stage 'evaluate'" in result.stdout
    assert running_runs(tiny_project) == [] and staging_leftovers(tiny_project) == []
    assert mlflow_client(tiny_project).get_run(run_id).info.status == "FINISHED"  # reopened and finished again


def test_forced_retraining_with_same_params_gives_identical_metrics(tiny_project):
    first = json.loads((tiny_project / "metrics" / "evaluate.json").read_text())
    first_history = (tiny_project / "metrics" / "train_history.csv").read_text()
    dvc("repro", "-f", "-s", "train", project=tiny_project)
    dvc("repro", project=tiny_project)
    assert json.loads((tiny_project / "metrics" / "evaluate.json").read_text()) == first
    assert (tiny_project / "metrics" / "train_history.csv").read_text() == first_history
    client = mlflow_client(tiny_project)
    newest = max(client.search_model_versions("name='mnist-cnn'"), key=lambda v: int(v.version))
    assert newest.tags["validation_status"] == "rejected"  # equal accuracy does not beat the margin

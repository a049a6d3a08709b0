"""The tools users know, on the tiny project's real stores: the MLflow UI through `python -m pipeline ui`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import copy_project, free_port
from tests.e2e.conftest import project_env, run

pytestmark = pytest.mark.slow


def serve_until_ready(command: list[str], cwd, env, url: str, timeout_s: float = 120.0) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{command} exited {process.returncode}: {process.stdout.read()[-2000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop(process)
    raise AssertionError(f"{url} never answered")


def stop(process: subprocess.Popen) -> str:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    return output


def test_ui_serves_the_project_store_from_a_subfolder(tiny_project):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui = serve_until_ready([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], tiny_project / "pipeline",
                           project_env(tiny_project), f"{base}/health")
    try:
        experiment = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name",
                                  params={"experiment_name": "mnist"}, timeout=10).json()["experiment"]
        tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens in the "Model training" view
        runs = requests.post(f"{base}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                             timeout=10).json()["runs"]
        assert any(r["data"].get("tags") and {"key": "mnist.run_kind", "value": "train"} in r["data"]["tags"] for r in runs)
    finally:
        output = stop(ui)
    assert f"MLflow UI on http://127.0.0.1:{port}" in output and str(tiny_project / "mlruns" / "mlflow.db") in output
    assert f"/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning" in output


def test_ui_without_a_store_says_so_in_one_line(tmp_path):
    project = copy_project(tmp_path / "fresh")
    result = run([sys.executable, "-m", "pipeline", "ui"], project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no MLflow store at")
    assert not (project / "mlruns" / "mlflow.db").exists()


def test_a_plain_mlflow_ui_leaves_git_status_clean(tmp_path):
    project = copy_project(tmp_path / "plain")
    port = free_port()
    ui = serve_until_ready([sys.executable, "-m", "mlflow", "ui", "--port", str(port)], project,
                           project_env(project), f"http://127.0.0.1:{port}/health")
    stop(ui)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True)
    assert status.stdout == ""


def test_a_repro_log_has_no_tensorflow_error_lines(tiny_project):
    """TensorFlow's C++ E0000/W0000 lines read as failures; the stages silence them before TF starts,
    while Keras' epoch lines and Optuna's trial lines stay."""
    import re

    log = (tiny_project / ".dvc" / "tmp" / "first-repro.log").read_text()
    assert "Running stage 'train'" in log and "Trial 0 finished" in log and "val_accuracy" in log
    assert [line for line in log.splitlines() if re.match(r"^[EW]\d{4} ", line)] == []


def test_project_commands_work_from_a_subfolder(tiny_project):
    info = run([sys.executable, "-m", "pipeline", "info"], tiny_project / "tests").stdout
    assert f"project_root: {tiny_project}" in info and f"paths.model: {tiny_project / 'models' / 'model.keras'}" in info
    listed = run([sys.executable, "-m", "pipeline", "registry"], tiny_project / "pipeline" / "core").stdout
    assert "champion" in listed

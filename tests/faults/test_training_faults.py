"""Faults during training: SIGKILL mid-fit loses nothing; the same params give the same metrics."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from tests.e2e.conftest import dvc, project_env
from tests.e2e.test_dvc_repro import mlflow_client

pytestmark = pytest.mark.slow


def versions_and_champion(project) -> tuple[int, str]:
    client = mlflow_client(project)
    return (len(client.search_model_versions("name='mnist-cnn'")),
            str(client.get_model_version_by_alias("mnist-cnn", "champion").version))


def test_sigkill_during_training_registers_nothing_and_next_repro_completes(tiny_project):
    import signal
    import subprocess
    import threading

    before = versions_and_champion(tiny_project)
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
    result = dvc("repro", project=tiny_project)
    assert "Running stage 'train'" in result.stdout
    assert "Running stage 'tune'" not in result.stdout  # a final-training knob never re-runs the study
    count, _ = versions_and_champion(tiny_project)
    assert count == before[0] + 1


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

"""Passwords in storage and tracking URLs never leave the process: masked in error lines, logs and `info`."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pipeline.core.errors import RedactingFilter, redact
from tests.conftest import copy_project
from tests.e2e.conftest import project_env

SECRET = "s3cr3t-pw"
STORAGE = f"postgresql+psycopg://optuna:{SECRET}@127.0.0.1:9/optuna"  # port 9: nothing listens
TRACKING = f"postgresql+psycopg://mlflow:{SECRET}@127.0.0.1:9/mlflow"


def test_redact_masks_every_url_password_and_nothing_else():
    assert redact(f"{STORAGE} and {TRACKING}") == ("postgresql+psycopg://optuna:***@127.0.0.1:9/optuna and "
                                                    "postgresql+psycopg://mlflow:***@127.0.0.1:9/mlflow")
    for clean in ("sqlite:////srv/optuna.db", "postgresql://user@host/db", "http://host:5000/#/experiments/1"):
        assert redact(clean) == clean


def test_log_records_are_masked(caplog):
    logger = logging.getLogger("pipeline.test-secrets")
    caplog.handler.addFilter(RedactingFilter())
    logger.warning("cannot reach %s", STORAGE)
    assert SECRET not in caplog.text and "optuna:***@" in caplog.text


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("secrets"))
    text = (root / "params.yaml").read_text().replace("storage: sqlite:///studies/optuna.db", f"storage: {STORAGE}")
    (root / "params.yaml").write_text(text)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("command", [["info"], ["dashboard"], ["registry"], ["tune"]])
def test_no_password_in_any_command_output(project, command):
    env = project_env(project) | {"MLFLOW_TRACKING_URI": TRACKING}
    result = subprocess.run([sys.executable, "-m", "pipeline", *command], cwd=project, env=env, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert SECRET not in output, output[-1500:]
    assert "***@127.0.0.1:9" in output  # the URL is still named, with its password masked

"""`python -m pipeline ui`: the MLflow UI on the project's tracking store, from any folder inside it.

A plain `mlflow ui` opens (and creates) `./mlflow.db` in the working folder, not the project's
store; this command finds the store the stages log to (`pipeline.core.tracking`) and serves it.
"""

from __future__ import annotations

import os
import sys

from pipeline.commands.common import address_options, parser
from pipeline.core import tracking
from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError, exit_on_user_error, redact
from pipeline.core.paths import sqlite_file

def ui_command(store_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri, "--host", host, "--port", str(port)]


def training_runs_url(base: str, experiment_id: str | None) -> str:
    """The experiment's runs in MLflow's "Model training" view (a plain link opens the GenAI view)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else base


def experiment_id(store_uri: str, name: str) -> str | None:
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=store_uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def require_store(store_uri: str) -> None:
    """One error line where the embedded store does not exist yet (the UI would create an empty one)."""
    database = sqlite_file(store_uri)
    if database is not None and not database.is_file():
        raise PipelineError(f"no MLflow store at {database} yet; run `dvc repro` "
                            "first (it tracks every stage there)")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parser("ui", __doc__.splitlines()[0], address_options(5000)).parse_args(argv)
    store_uri = tracking.tracking_uri()
    if tracking.is_remote(store_uri):
        print(f"the project tracks to the MLflow server {redact(store_uri)}: open it there")
        return 0
    require_store(store_uri)
    base = f"http://{args.host}:{args.port}"
    runs = training_runs_url(base, experiment_id(store_uri, load_params().tracking.experiment))
    print(f"MLflow UI on {base} (store {redact(store_uri)}); the training runs: {runs}; Ctrl-C stops it", flush=True)
    command = ui_command(store_uri, args.host, args.port)
    os.execv(command[0], command)  # the UI takes over this process: Ctrl-C and signals reach it directly
    return 0  # not reached

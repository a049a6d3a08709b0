"""MLflow wiring: where the store is, the project's experiment, and run tags.

The default store is embedded: `mlruns/mlflow.db` (SQLite) plus `mlruns/artifacts/`, resolved to
absolute paths in the user's repository so `dvc exp run --temp`/`--queue` log to the same place.
`MLFLOW_TRACKING_URI` overrides it (a tracking server, PostgreSQL, ...).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.paths import project_root

log = logging.getLogger("pipeline.core.tracking")

STORE_DIR = "mlruns"
RUN_KIND_TAG = "mnist.run_kind"  # train | tune-study | tune-trial: filter in the MLflow UI
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on training runs


def default_tracking_uri(root: Path | None = None) -> str:
    return f"sqlite:///{(root or project_root()) / STORE_DIR / 'mlflow.db'}"


def default_artifact_root(root: Path | None = None) -> str:
    return ((root or project_root()) / STORE_DIR / "artifacts").as_uri()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def registry_uri() -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def configure_tracking() -> str:
    """Point MLflow at the project's store (creating the embedded one) and return the URI."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri())
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, created with an absolute artifact root for the embedded store.

    Fails with one line when the store cannot be reached, before any training starts.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_tracking()
    if _is_remote(uri) and not uri.startswith("databricks"):
        check_server(uri)
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            location = None if _is_remote(uri) else default_artifact_root()
            experiment_id = mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        else:
            experiment_id = experiment.experiment_id
    except MlflowException as error:
        raise PipelineError(
            f"MLflow tracking store {uri} is unreachable ({_first_line(error)}); start the server "
            "or unset MLFLOW_TRACKING_URI to use the embedded store"
        ) from None
    except Exception as error:  # connection errors surface as requests/sqlalchemy exceptions
        raise PipelineError(
            f"MLflow tracking store {uri} is unreachable ({type(error).__name__}: {_first_line(error)}); "
            "start the server or unset MLFLOW_TRACKING_URI to use the embedded store"
        ) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """One quick health probe, so a down server fails in seconds rather than after MLflow's retries."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as error:
        raise PipelineError(
            f"MLflow tracking store {uri} is unreachable ({type(error).__name__}); start the server "
            "or unset MLFLOW_TRACKING_URI to use the embedded store"
        ) from None


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def git_commit(root: Path | None = None) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def run_tags(kind: str, params_digest: str) -> dict[str, str]:
    """Tags every run carries: what kind of run, the code version, the DVC experiment, the params."""
    tags = {RUN_KIND_TAG: kind, "mlflow.source.git.commit": git_commit(), "params_hash": params_digest}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


# Run tags a registered version repeats, under the version's own names: where the model came from.
PROVENANCE_TAGS = {"mlflow.source.git.commit": "git_commit", "params_hash": "params_hash",
                   "dvc_exp_name": "dvc_exp_name", "dvc_exp_baseline_rev": "dvc_exp_baseline_rev"}


def provenance_tags(tags: dict[str, str]) -> dict[str, str]:
    """The commit, params digest and DVC experiment of a run's `tags`, named for a model version."""
    return {version_key: tags[run_key] for run_key, version_key in PROVENANCE_TAGS.items() if tags.get(run_key)}


def flatten(prefix: str, values: dict) -> dict[str, str]:
    """Nested params as MLflow's flat `a.b` keys, lists as strings."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(name, value))
        else:
            flat[name] = str(value)
    return flat

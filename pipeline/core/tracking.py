"""MLflow wiring: where the store is, the project's experiment, and run tags.

The default store is embedded: `mlruns/mlflow.db` (SQLite) plus `mlruns/artifacts/`, resolved to
absolute paths in the user's repository so `dvc exp run --temp`/`--queue` log to the same place.
`MLFLOW_TRACKING_URI` overrides it (a tracking server, PostgreSQL, ...).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import warnings
from pathlib import Path

from pipeline.core.errors import PipelineError, first_line, redact
from pipeline.core.paths import SQLITE_PREFIX, project_root, sqlite_file

log = logging.getLogger("pipeline.core.tracking")

STORE_DIR = "mlruns"
RUN_KIND_TAG = "mnist.run_kind"  # train | tune-study | tune-trial: filter in the MLflow UI
OWNER_TAG = "mnist.owner"  # <host>/<pid>/<process start time> of the process that has the run open
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on training runs


def default_tracking_uri(root: Path | None = None) -> str:
    return f"{SQLITE_PREFIX}{(root or project_root()) / STORE_DIR / 'mlflow.db'}"


def default_artifact_root(root: Path | None = None) -> str:
    return ((root or project_root()) / STORE_DIR / "artifacts").as_uri()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def registry_uri() -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def configure_tracking() -> str:
    """Point MLflow at the project's store (creating the embedded one) and return the URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # works offline: no usage reports sent out
    import mlflow

    uri = tracking_uri()
    database = sqlite_file(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri())
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, created with an absolute artifact root for the embedded store.

    Fails with one line when the store cannot be reached, before any training starts. Runs that a
    killed process of this machine left RUNNING are closed here, as every stage starts.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_tracking()
    if is_remote(uri) and not uri.startswith("databricks"):
        check_server(uri)
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            location = None if is_remote(uri) else default_artifact_root()
            experiment_id = mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        else:
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tags existed get them too
                if experiment.tags.get(key) != value:
                    mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
    except MlflowException as error:
        raise store_unreachable(uri, first_line(error)) from None
    except Exception as error:  # connection errors surface as requests/sqlalchemy exceptions
        raise store_unreachable(uri, f"{type(error).__name__}: {first_line(error)}") from None
    mlflow.set_experiment(experiment_id=experiment_id)
    close_orphaned_runs(experiment_id)  # every stage starts here: a killed predecessor's runs end now
    return experiment_id


def store_unreachable(uri: str, why: str) -> PipelineError:
    """The one message for a tracking store (server or database) that does not answer."""
    return PipelineError(f"MLflow tracking store {redact(uri)} is unreachable ({redact(why)}); start it, "
                         "or unset MLFLOW_TRACKING_URI to use the embedded store")


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """One quick health probe, so a down server fails in seconds rather than after MLflow's retries."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as error:
        raise store_unreachable(uri, type(error).__name__) from None


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def git_commit(root: Path | None = None) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def process_owner(pid: int | None = None) -> str:
    """This process as a run's owner: host, pid and start time (a reused pid is another process)."""
    import psutil

    process = psutil.Process(pid or os.getpid())
    return f"{socket.gethostname()}/{process.pid}/{process.create_time():.2f}"


def owner_is_gone(owner: str) -> bool:
    """Whether the process an owner tag names has ended. Another machine's runs are never judged."""
    import psutil

    host, _, rest = owner.partition("/")
    pid, _, started = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        return process.status() == psutil.STATUS_ZOMBIE or f"{process.create_time():.2f}" != started
    except psutil.NoSuchProcess:
        return True


def close_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs a killed process of this machine left RUNNING (SIGKILL skips MLflow's
    own end_run); runs of live processes and of other machines are left alone. Returns their ids."""
    import mlflow

    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    closed = []
    try:
        for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
            owner = run.data.tags.get(OWNER_TAG, "")
            if owner and owner_is_gone(owner):
                client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
                log.warning("closed MLflow run %s (%s): its process %s was killed before the run ended",
                            run.info.run_id, run.info.run_name, owner)
    except MlflowException as error:  # housekeeping: the stage's own store calls report a real outage
        log.warning("could not close runs left RUNNING by killed processes (%s)", first_line(error))
    return closed


def run_tags(kind: str, params_digest: str) -> dict[str, str]:
    """Tags every run carries: what kind of run, its owning process, the code version, the DVC
    experiment, the params."""
    tags = {RUN_KIND_TAG: kind, OWNER_TAG: process_owner(), "mlflow.source.git.commit": git_commit(),
            "params_hash": params_digest}
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


# ---- what a training run records besides params and metrics ----------------------------------------

SYSTEM_METRICS_INTERVAL_S = 5.0  # MLflow's 10 s default records nothing for a run shorter than that
SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"


def sample_system_metrics() -> None:
    """Runs started with `log_system_metrics=True` sample CPU, memory and disk (`system/*` metrics)
    every SYSTEM_METRICS_INTERVAL_S, unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise."""
    import mlflow

    if not os.environ.get(SYSTEM_METRICS_INTERVAL_ENV):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)


def log_split(split, path: str | Path, name: str, context: str) -> None:
    """Record a data split (`pipeline.core.data.Split`) as an input of the active run, under `name` with
    its content digest and file: the MLflow UI's Dataset column. `context`: training, validation or testing."""
    import mlflow
    import mlflow.data

    from pipeline.core.data import split_digest

    with warnings.catch_warnings():  # a local path fits both of MLflow's local source types; either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_numpy(split.x, source=str(Path(path).resolve()), targets=split.y, name=name,
                                         digest=split_digest(split))
    mlflow.log_input(dataset, context=context)


def log_table(table: dict[str, list], artifact_file: str) -> None:
    """`mlflow.log_table` into the active run, replacing the table an earlier evaluation of the same run
    left (MLflow would append the new rows to it)."""
    import posixpath

    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = mlflow.active_run()
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file in {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, folder)}:
        get_artifact_repository(run.info.artifact_uri).delete_artifacts(artifact_file)
    mlflow.log_table(table, artifact_file)

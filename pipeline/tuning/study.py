"""The persistent Optuna study: its storage, name, sampler and pruner, and what it has found.

The study lives in persistent storage (SQLite in the repository by default, any RDB URL such as
PostgreSQL for many workers), so `dvc repro -f`, an interrupted run or `tune --more N` continue it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

from pipeline.core.config import Params, TuneParams
from pipeline.core.errors import PipelineError, first_line, redact
from pipeline.core.paths import SQLITE_PREFIX, sqlite_file


log = logging.getLogger("pipeline.tuning")

FINISHED = ("COMPLETE", "PRUNED")
OBJECTIVE = "val_accuracy"  # what every trial returns


def resolve_storage_url(url: str) -> str:
    """The storage URL with a relative SQLite path made absolute; other URLs as given."""
    path = sqlite_file(url)
    return url if path is None else f"{SQLITE_PREFIX}{path}"


def study_name(params: Params) -> str:
    """`tune.study_name` plus a digest of everything that makes trial values comparable (search
    space, base preset, tuning data and epochs, seed, precision). Re-running with the same settings
    continues the same study; changing the space or the objective starts a new one."""
    tune = params.tune
    identity = {
        "seed": params.seed, "precision": params.runtime.precision,
        "preprocess": {key: getattr(params.preprocess, key) for key in ("val_size", "train_limit")},
        "base": params.presets[tune.base_preset].model_dump(), "space": {k: v.model_dump() for k, v in tune.space.items()},
        "train_images": tune.train_images, "val_images": tune.val_images, "epochs": tune.epochs,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{tune.study_name}-{digest}"


STORAGE_RETRY_S = 120.0  # how long one storage call rides out an outage before the worker gives up
TRANSIENT_ERRORS = ("OperationalError", "InterfaceError", "DisconnectionError")  # sqlalchemy.exc: connection-level


def is_transient(error: BaseException) -> bool:
    """A lost or refused database connection (or a locked SQLite file), also when Optuna wrapped it in
    StorageInternalError; invalid data and missing records are not retried."""
    while error is not None:
        if type(error).__module__.startswith("sqlalchemy") and type(error).__name__ in TRANSIENT_ERRORS:
            return True
        error = error.__cause__
    return False


# Optuna wraps an RDBStorage in its private _CachedStorage, which calls these backend methods of
# RDBStorage directly, outside any public one: they carry trial creation, parameter writes, best-trial
# and stale-trial lookups, so an outage there must be ridden out too. Optuna offers no public hook.
CACHED_STORAGE_BACKEND_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id",
                                "_get_stale_trial_ids")


def retried_method_names(storage_class) -> list[str]:
    """Every method of Optuna's public storage interface (BaseStorage), plus the backend calls above."""
    import inspect

    from optuna.storages import BaseStorage

    public = [name for name, _ in inspect.getmembers(BaseStorage, inspect.isfunction)
              if not name.startswith("_") and name != "remove_session"]  # remove_session makes no query
    return [name for name in (*public, *CACHED_STORAGE_BACKEND_CALLS) if hasattr(storage_class, name)]


@functools.cache
def make_resilient_storage_class():
    """RDBStorage that rides out a storage outage (imported lazily: Optuna is heavy).

    Every storage call is retried with backoff while the error is transient (`is_transient`), for up
    to STORAGE_RETRY_S; a retried finishing write that had in fact been committed counts as done. A
    heartbeat that cannot be written is logged and the heartbeat thread beats on (Optuna's thread
    dies on the first exception, and its live trial would then be failed as dead).
    """
    import threading
    import time

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RDBStorage

    nesting = threading.local()  # a retried call that makes other storage calls retries them as one

    def retried(method):
        def call(self, *args, **kwargs):
            if getattr(nesting, "depth", 0):
                return method(self, *args, **kwargs)
            nesting.depth, deadline, delay, failures = 1, time.monotonic() + self.retry_s, 0.5, 0
            try:
                while True:
                    try:
                        result = method(self, *args, **kwargs)
                    except Exception as error:
                        if not is_transient(error) or time.monotonic() + delay > deadline:
                            raise
                        if not failures:
                            log.warning("Optuna storage call %s failed (%s: %s); retrying for up to %.0f s",
                                        method.__name__, type(error).__name__, redact(first_line(error)), self.retry_s)
                        failures += 1
                        time.sleep(delay)
                        delay = min(delay * 2, 5.0)
                        continue
                    if failures:
                        log.warning("Optuna storage call %s succeeded after %d retries", method.__name__, failures)
                    return result
            finally:
                nesting.depth = 0

        call.__name__ = method.__name__
        return call

    class ResilientStorage(RDBStorage):
        retry_s = STORAGE_RETRY_S

        def set_trial_state_values(self, trial_id, state, values=None):
            attempts = []

            def once(storage):
                attempts.append(1)
                try:
                    return RDBStorage.set_trial_state_values(storage, trial_id, state, values)
                except UpdateFinishedTrialError:
                    if len(attempts) > 1 and state.is_finished() and RDBStorage.get_trial(storage, trial_id).state == state:
                        return True  # the attempt that failed had committed: only its answer was lost
                    raise

            once.__name__ = "set_trial_state_values"
            return retried(once)(self)

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                RDBStorage.record_heartbeat(self, trial_id)
            except Exception as error:  # the thread must live: the next beat may get through
                log.warning("trial %d: heartbeat not recorded (%s: %s); beating on", trial_id,
                            type(error).__name__, redact(first_line(error)))

    for name in retried_method_names(RDBStorage):
        if name not in vars(ResilientStorage):  # the two overridden above keep their own handling
            setattr(ResilientStorage, name, retried(getattr(RDBStorage, name)))
    return ResilientStorage


def make_storage(tune: TuneParams):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    url = tune.storage
    resolved = resolve_storage_url(url)
    database = sqlite_file(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    try:
        return make_resilient_storage_class()(
            resolved,
            heartbeat_interval=tune.heartbeat_interval_s,
            grace_period=tune.grace_period_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            # SQLite: wait for a busy database (optuna-dashboard, a second process) instead of failing; a server:
            # test pooled connections before use, so one that an outage cut is replaced, not used and failed
            engine_kwargs={"connect_args": {"timeout": 60}} if resolved.startswith("sqlite") else {"pool_pre_ping": True},
        )
    except (optuna.exceptions.StorageInternalError, Exception) as error:
        raise PipelineError(
            f"Optuna storage {redact(url)} is unreachable ({type(error).__name__}: {redact(first_line(error))}); "
            "start the database or set tune.storage to sqlite:///studies/optuna.db"
        ) from None


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def make_sampler(seed: int, trials_so_far: int):
    """TPE seeded from the project seed, offset by the trials already run so a resumed study
    does not replay the same random start-up trials."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed + trials_so_far, n_startup_trials=5, multivariate=True)


def open_study(params: Params, storage=None, create: bool = True, sampler_offset: int = 0):
    """Load (or create) the persistent study; fails stale trials of dead workers first.

    Workers pass a `sampler_offset` of their own so that workers starting together do not
    sample the same start-up trials."""
    import optuna

    storage = storage or make_storage(params.tune)
    try:
        existing = optuna.load_study(study_name=study_name(params), storage=storage)
        trials_so_far = len(existing.trials)
    except KeyError:
        if not create:
            raise PipelineError(f"no study {study_name(params)!r} in {params.tune.storage}; create it with "
                                "`dvc repro tune` (or `python -m pipeline tune`) using the same params.yaml") from None
        trials_so_far = 0
    study = optuna.create_study(
        study_name=study_name(params), storage=storage, direction="maximize", load_if_exists=True,
        sampler=make_sampler(params.seed + sampler_offset, trials_so_far), pruner=make_pruner(params.tune.pruner, params.tune.epochs),
    )
    optuna.storages.fail_stale_trials(study)
    study.set_user_attr("base_preset", params.tune.base_preset)
    if study.metric_names != [OBJECTIVE]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and the way to name the axis
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])  # optuna-dashboard's axis, not "Objective 0"
    return study


def close_failed_trial_runs(study) -> int:
    """Mark the MLflow runs of trials that died with their worker as FAILED (SIGKILL leaves them RUNNING)."""
    from mlflow import MlflowClient

    client, closed = MlflowClient(), 0
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.state.name != "FAIL" or not run_id:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:  # the run lives in another tracking store
            continue
        # RUNNING, or KILLED by tracking.close_orphaned_runs as the session started: a failed trial's run is FAILED
        if run.info.status in ("RUNNING", "KILLED") and "optuna.state" not in run.data.tags:
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_terminated(run_id, status="FAILED")
            closed += 1
    return closed


def count_states(study) -> dict[str, int]:
    return dict(Counter(trial.state.name for trial in study.get_trials(deepcopy=False)))


def finished_trials(study) -> int:
    counts = count_states(study)
    return sum(counts.get(state, 0) for state in FINISHED)


def study_summary(study, base_preset: str) -> dict:
    """Best value and params, the baseline (untuned preset) value, and trial counts."""
    import optuna

    try:
        best = study.best_trial
    except ValueError:  # Optuna's answer for a study without a completed trial
        raise PipelineError("the study has no completed trial yet; raise tune.n_trials or tune.timeout_s") from None
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    return {
        "study_name": study.study_name,
        "base_preset": base_preset,
        "best_value": best.value,
        "best_trial": best.number,
        "baseline_value": None if baseline is None else baseline.value,
        "trials": count_states(study),
        "trial_params": best.params,
    }


def best_params_record(summary: dict, overrides: dict) -> dict:
    """What `train` reads, and nothing that changes while the best trial stays the same (trial counts
    live in the summary), so more trials that find nothing better do not re-run `train`."""
    return {"study_name": summary["study_name"], "base_preset": summary["base_preset"],
            "best_trial": summary["best_trial"], "params": overrides}


def summary_metrics(summary: dict) -> dict:
    """The summary as DVC metrics: the study, best and baseline values, trial counts (the best values
    themselves are in best_params.json)."""
    return {key: summary[key] for key in ("study_name", "best_value", "best_trial", "baseline_value", "trials")}


def log_study_figures(study, directory: Path) -> list[Path]:
    """Optuna's own figures (matplotlib backend) as PNGs; skips ones the study cannot draw yet."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ov

    drawers = {
        "optimization_history": ov.plot_optimization_history,
        "param_importances": ov.plot_param_importances,
        "parallel_coordinate": ov.plot_parallel_coordinate,
        "intermediate_values": ov.plot_intermediate_values,
    }
    written = []
    for name, draw in drawers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                log.info("skipping %s figure: %s", name, error)
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(10, 6)
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written

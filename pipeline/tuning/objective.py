"""One trial: train a suggested recipe on the tuning subsample, report each epoch to the pruner,
and log it as a nested MLflow run."""

from __future__ import annotations

import gc
import logging
import os
import socket
import time

import numpy as np

from pipeline.core.config import Params, params_hash
from pipeline.core.errors import PipelineError
from pipeline.tuning.space import suggest
from pipeline.tuning.study import OBJECTIVE

log = logging.getLogger("pipeline.tuning")

MONITOR = OBJECTIVE  # what Keras reports each epoch, and what the trial returns


def require_metric_callback(monitor: str):
    """Fail the trial loudly when Keras does not report the monitored metric (Optuna only warns)."""
    import keras

    class RequireMetric(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if monitor not in (logs or {}):
                raise PipelineError(f"Keras reported no {monitor!r} (got {sorted(logs or {})}); tuning needs validation data")

    return RequireMetric()


def pruning_callback(trial, monitor: str, epochs: int):
    """Optuna's Keras pruning callback, except after the last epoch: there the value is reported but
    never pruned, since the trial has already cost all its epochs and pruning it would only throw
    its result away."""
    from optuna_integration import KerasPruningCallback

    class PruneBeforeLastEpoch(KerasPruningCallback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 < epochs:
                super().on_epoch_end(epoch, logs)
            else:
                trial.report(float((logs or {})[monitor]), step=epoch)

    return PruneBeforeLastEpoch(trial, monitor)


class Objective:
    """Trains one trial's model on the tuning subsample; logs it as a nested MLflow run."""

    def __init__(self, params: Params, data: dict[str, np.ndarray], parent_run_id: str | None):
        self.params = params
        self.data = data
        self.parent_run_id = parent_run_id
        self.base = params.presets[params.tune.base_preset]

    def __call__(self, trial) -> float:
        import keras
        import mlflow
        import optuna

        from pipeline.core import tracking
        from pipeline.core.training import fit

        tune = self.params.tune
        overrides = suggest(trial, tune.space)
        recipe = self.base.with_overrides(overrides)
        keras.backend.clear_session()
        gc.collect()
        keras.utils.set_random_seed(self.params.seed + trial.number)
        tags = {**tracking.run_tags("tune-trial", params_hash(self.params)), "optuna.study": trial.study.study_name,
                "optuna.trial": str(trial.number)}
        nested = mlflow.active_run() is not None
        if self.parent_run_id and not nested:  # a worker process outside the parent run
            tags["mlflow.parentRunId"] = self.parent_run_id
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=nested, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            mlflow.log_params({**{f"trial.{k}": str(v) for k, v in overrides.items()},
                               **tracking.flatten("recipe", recipe.model_dump()), "trial_number": trial.number})
            history: list[dict] = []

            def record(row: dict) -> None:
                history.append(row)
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

            started = time.perf_counter()
            try:
                fit(recipe, tune.epochs, None, self.data["x_train"], self.data["y_train"], self.data["x_val"],
                    self.data["y_val"], self.params.seed, on_epoch=record, verbose=0,
                    callbacks=[require_metric_callback(MONITOR), pruning_callback(trial, MONITOR, tune.epochs)])
            except optuna.TrialPruned:
                mlflow.set_tags({"optuna.state": "PRUNED", "epochs_run": str(len(history))})
                mlflow.log_metric("trial_seconds", time.perf_counter() - started)
                log.info("trial %d pruned after %d epochs", trial.number, len(history))
                mlflow.end_run()  # FINISHED, not the FAILED the `with` gives an exception: pruning is no failure
                raise
            except Exception:
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            value = max(row[MONITOR] for row in history)
            mlflow.log_metrics({"best_val_accuracy": value, "trial_seconds": time.perf_counter() - started})
            mlflow.set_tags({"optuna.state": "COMPLETE", "epochs_run": str(len(history))})
        return value


def tuning_data(params: Params) -> dict[str, np.ndarray]:
    """The stratified subsamples every trial trains and validates on (loaded once per session)."""
    from pipeline.core.data import load_split, stratified_take
    from pipeline.core.data import as_model_input

    train = stratified_take(load_split(params.paths.train_split), params.tune.train_images, params.seed)
    val = stratified_take(load_split(params.paths.val_split), params.tune.val_images, params.seed)
    return {"x_train": as_model_input(train.x), "y_train": train.y, "x_val": as_model_input(val.x), "y_val": val.y}

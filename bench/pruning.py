"""What pruning saves: the same Optuna study run twice in one process, with and without the pruner.

Both runs use the project's own trial code (`pipeline.tune.Objective`), the same seeded TPE sampler,
search space, tuning subsample and trial budget; only the pruner differs. Trials log to a throw-away
MLflow store, so both runs pay the same per-epoch logging cost and the project's store stays clean.
After the first trials the two runs sample different points: TPE learns from pruned trials too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

from pipeline.core.config import Params

log = logging.getLogger("bench.pruning")

NO_PRUNER = "none"


def with_tune(params: Params, **updates) -> Params:
    """A copy of params with some `tune` fields replaced (None leaves a field as it is)."""
    updates = {key: value for key, value in updates.items() if value is not None}
    return params.model_copy(update={"tune": params.tune.model_copy(update=updates)})


def trial_record(trial) -> dict:
    """One trial: state, epochs it actually trained (one reported value per epoch), value, seconds."""
    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 3)
    return {"number": trial.number, "state": trial.state.name, "epochs": len(trial.intermediate_values),
            "value": trial.value, "seconds": seconds, "params": trial.params}


def summarize_arm(pruner: str, trials: list[dict], wall_seconds: float, max_epochs: int) -> dict:
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"]) if complete else None
    return {
        "pruner": pruner,
        "trials": len(trials),
        "complete": len(complete),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "trial_epochs": sum(t["epochs"] for t in trials),
        "trial_epochs_without_pruning": len(trials) * max_epochs,
        "wall_seconds": round(wall_seconds, 3),
        "best_val_accuracy": None if best is None else best["value"],
        "best_trial": None if best is None else best["number"],
        "best_params": None if best is None else best["params"],
        "per_trial": trials,
    }


def saving(pruned: dict, unpruned: dict) -> dict:
    epochs_ratio = pruned["trial_epochs"] / unpruned["trial_epochs"] if unpruned["trial_epochs"] else None
    best_difference = None
    if pruned["best_val_accuracy"] is not None and unpruned["best_val_accuracy"] is not None:
        best_difference = round(pruned["best_val_accuracy"] - unpruned["best_val_accuracy"], 5)
    return {
        "trial_epochs_ratio": None if epochs_ratio is None else round(epochs_ratio, 3),
        "trial_epochs_saved_fraction": None if epochs_ratio is None else round(1 - epochs_ratio, 3),
        "wall_seconds_ratio": round(pruned["wall_seconds"] / unpruned["wall_seconds"], 3) if unpruned["wall_seconds"] else None,
        "best_val_accuracy_difference": best_difference,
    }


@contextlib.contextmanager
def scratch_tracking_store():
    """Point MLflow at an empty SQLite store in a temporary folder for the duration."""
    import mlflow

    previous_env, previous_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        try:
            mlflow.MlflowClient().search_experiments()  # creates the schema before anything is timed
            yield uri
        finally:
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env
            mlflow.set_tracking_uri(previous_uri)


def warm_up(params: Params, data: dict) -> None:
    """One short fit so TensorFlow's one-time start-up costs land on neither measured run."""
    import keras

    from pipeline.core.model import build_model
    from pipeline.core.training import compile_model

    recipe = params.presets[params.tune.base_preset]
    model = compile_model(build_model(recipe, seed=params.seed), recipe, steps_per_epoch=2, epochs=1)
    model.fit(data["x_train"][:256], data["y_train"][:256], validation_data=(data["x_val"][:128], data["y_val"][:128]),
              epochs=1, batch_size=recipe.batch_size, verbose=0)
    keras.backend.clear_session()


def run_arm(params: Params, data: dict, pruner: str) -> dict:
    """One full study in memory with `pruner`; returns its summary."""
    import optuna

    from pipeline.tuning.objective import Objective
    from pipeline.tuning.space import baseline_params
    from pipeline.tuning.study import make_pruner, make_sampler

    tune = params.tune
    study = optuna.create_study(study_name=f"bench-{pruner}", storage=optuna.storages.InMemoryStorage(),
                                direction="maximize", sampler=make_sampler(params.seed, 0),
                                pruner=make_pruner(pruner, tune.epochs))
    if tune.enqueue_preset and (baseline := baseline_params(params.presets[tune.base_preset], tune.space)):
        study.enqueue_trial(baseline, user_attrs={"baseline": True})

    def report(study, trial):
        log.info("pruner %s: trial %d %s after %d epoch(s), val_accuracy %s", pruner, trial.number,
                 trial.state.name.lower(), len(trial.intermediate_values),
                 "-" if trial.value is None else f"{trial.value:.4f}")

    started = time.perf_counter()
    study.optimize(Objective(params, data, None), n_trials=tune.n_trials, gc_after_trial=True, catch=(),
                   callbacks=[report])
    wall_seconds = time.perf_counter() - started
    return summarize_arm(pruner, [trial_record(t) for t in study.trials], wall_seconds, tune.epochs)


def run_pruning_benchmark(params: Params) -> dict:
    """The study with params' pruner, then without one; returns the results record."""
    import optuna

    from bench.machine import framework_versions, load_average_1m, machine_info
    from pipeline.core.runtime import setup_tensorflow
    from pipeline.tuning.objective import tuning_data
    from pipeline.tuning.space import validate_space

    tune = params.tune
    validate_space(params.presets[tune.base_preset], tune.space)
    if tune.pruner == NO_PRUNER:
        log.warning("tune.pruner is 'none': both runs are unpruned and the saving is zero by construction")
    machine = machine_info()
    setup_tensorflow(params.runtime, params.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = tuning_data(params)
    with scratch_tracking_store():
        warm_up(params, data)
        arms = {"pruned": run_arm(params, data, tune.pruner), "unpruned": run_arm(params, data, NO_PRUNER)}
    import keras

    return {
        "benchmark": "pruning",
        "machine": {**machine, **framework_versions(), "load_average_1m_at_end": load_average_1m()},
        "settings": {"seed": params.seed, "runtime": params.runtime.model_dump(), "n_trials": tune.n_trials,
                     "epochs": tune.epochs, "train_images": len(data["y_train"]), "val_images": len(data["y_val"]),
                     "base_preset": tune.base_preset, "enqueue_preset": tune.enqueue_preset,
                     "dtype_policy": keras.mixed_precision.global_policy().name,
                     "space": {name: dim.model_dump() for name, dim in tune.space.items()}},
        "arms": arms,
        "saving": saving(arms["pruned"], arms["unpruned"]),
    }

"""Stage 3: an Optuna study over the search space in `params.yaml`, every trial an MLflow run.

The study lives in persistent storage (SQLite in the repo by default, any RDB URL such as
PostgreSQL for many workers), so `dvc repro -f`, an interrupted run or `tune --more N` continue it.
The best params go to `models/best_params.json`, which final training applies on top of the preset;
the study's best value, baseline and trial counts to `metrics/tune.json`, a DVC metric.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from pipeline.config import Choice, FloatRange, IntRange, Params, Recipe, TuneParams, load_params, params_hash
from pipeline.errors import PipelineError, exit_on_user_error
from pipeline.paths import resolve_in_project
from pipeline.runtime import setup_logging, setup_tensorflow

log = logging.getLogger("pipeline.tune")

MONITOR = "val_accuracy"
FINISHED = ("COMPLETE", "PRUNED")


# ---- search space ---------------------------------------------------------------------------

def encode_choice(value):
    """Optuna choices must be scalars: lists (conv_filters) travel as '32-64' strings."""
    return "-".join(str(v) for v in value) if isinstance(value, list) else value


def decode_choice(value, original_choices: list):
    for choice in original_choices:
        if encode_choice(choice) == value:
            return choice
    return value


def suggest(trial, space: dict) -> dict:
    """Sample one value per search dimension; returns Recipe overrides (decoded)."""
    values = {}
    for name, dimension in space.items():
        if isinstance(dimension, Choice):
            picked = trial.suggest_categorical(name, [encode_choice(c) for c in dimension.choices])
            values[name] = decode_choice(picked, dimension.choices)
        elif isinstance(dimension, IntRange):
            values[name] = trial.suggest_int(name, dimension.low, dimension.high, step=dimension.step, log=dimension.log)
        elif isinstance(dimension, FloatRange):
            values[name] = trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)
    return values


def validate_space(base: Recipe, space: dict) -> None:
    """Every choice and range end must make a valid recipe, checked before any trial runs."""
    for name, dimension in space.items():
        ends = dimension.choices if isinstance(dimension, Choice) else [dimension.low, dimension.high]
        for value in ends:
            try:
                base.with_overrides({name: value})
            except ValidationError as error:
                first = error.errors()[0]["msg"]
                raise PipelineError(f"bad parameter in params.yaml: tune.space.{name}: value {value!r}: {first}") from None


def baseline_params(base: Recipe, space: dict) -> dict:
    """The untuned preset expressed in the study's parameter names (to enqueue as trial 0)."""
    values = {}
    for name, dimension in space.items():
        value = getattr(base, name)
        if isinstance(dimension, Choice):
            if encode_choice(value) not in [encode_choice(c) for c in dimension.choices]:
                return {}  # the preset lies outside the space; no baseline trial
            value = encode_choice(value)
        elif not dimension.low <= value <= dimension.high:
            return {}
        values[name] = value
    return values


# ---- optuna building blocks -----------------------------------------------------------------

SQLITE_PREFIX = "sqlite:///"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite storage URL, a relative path resolved in the user's repository
    (also under `dvc exp run --temp`); None for other databases."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    return resolve_in_project(url.removeprefix(SQLITE_PREFIX))


def resolve_storage_url(url: str) -> str:
    """The storage URL with a relative SQLite path made absolute; other URLs as given."""
    path = sqlite_file(url)
    return url if path is None else f"{SQLITE_PREFIX}{path}"


def study_name(params: Params) -> str:
    """`tune.study_name` plus a digest of everything that makes trial values comparable (search
    space, base preset, tuning data and epochs, seed, precision). Re-running with the same settings
    continues the same study; changing the space or the objective starts a new one."""
    import hashlib

    tune = params.tune
    identity = {
        "seed": params.seed, "precision": params.runtime.precision, "preprocess": params.preprocess.model_dump(),
        "base": params.presets[tune.base_preset].model_dump(), "space": {k: v.model_dump() for k, v in tune.space.items()},
        "train_images": tune.train_images, "val_images": tune.val_images, "epochs": tune.epochs,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{tune.study_name}-{digest}"


def make_storage(tune: TuneParams):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = tune.storage
    resolved = resolve_storage_url(url)
    database = sqlite_file(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    try:
        return RDBStorage(
            resolved,
            heartbeat_interval=tune.heartbeat_interval_s,
            grace_period=tune.grace_period_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            # SQLite: wait for a busy database (optuna-dashboard, a second process) instead of failing
            engine_kwargs={"connect_args": {"timeout": 60}} if resolved.startswith("sqlite") else {"pool_pre_ping": True},
        )
    except (optuna.exceptions.StorageInternalError, Exception) as error:
        raise PipelineError(
            f"Optuna storage {url} is unreachable ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
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
    return study


def close_failed_trial_runs(study) -> int:
    """Mark the MLflow runs of trials that died with their worker as FAILED (they stay RUNNING)."""
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
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_terminated(run_id, status="FAILED")
            closed += 1
    return closed


def count_states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def finished_trials(study) -> int:
    counts = count_states(study)
    return sum(counts.get(state, 0) for state in FINISHED)


# ---- the objective ----------------------------------------------------------------------------

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

        from pipeline import tracking
        from pipeline.model import prepare_training
        from pipeline.train import make_epoch_recorder

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
            model, leading_callbacks = prepare_training(recipe, self.params.seed, len(self.data["y_train"]), tune.epochs)
            history: list[dict] = []
            recorder = make_epoch_recorder(history, on_epoch=lambda row: mlflow.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])))
            started = time.perf_counter()
            try:
                model.fit(self.data["x_train"], self.data["y_train"],
                          validation_data=(self.data["x_val"], self.data["y_val"]),
                          epochs=tune.epochs, batch_size=recipe.batch_size, shuffle=True, verbose=0,
                          callbacks=[*leading_callbacks, recorder, require_metric_callback(MONITOR),
                                     pruning_callback(trial, MONITOR, tune.epochs)])
            except optuna.TrialPruned:
                mlflow.set_tags({"optuna.state": "PRUNED", "epochs_run": str(len(history))})
                mlflow.log_metric("trial_seconds", time.perf_counter() - started)
                log.info("trial %d pruned after %d epochs", trial.number, len(history))
                raise
            except Exception:
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            value = max(row[MONITOR] for row in history)
            mlflow.log_metrics({"best_val_accuracy": value, "trial_seconds": time.perf_counter() - started})
            mlflow.set_tags({"optuna.state": "COMPLETE", "epochs_run": str(len(history))})
        del model
        return value


def tuning_data(params: Params) -> dict[str, np.ndarray]:
    """The stratified subsamples every trial trains and validates on (loaded once per session)."""
    from pipeline.preprocess import load_splits, stratified_take
    from pipeline.train import as_model_input

    splits = load_splits(params.preprocess.output_dir, ("train", "val"))
    train = stratified_take(splits["train"], params.tune.train_images, params.seed)
    val = stratified_take(splits["val"], params.tune.val_images, params.seed)
    return {"x_train": as_model_input(train.x), "y_train": train.y, "x_val": as_model_input(val.x), "y_val": val.y}


# ---- study sessions and results ---------------------------------------------------------------

def study_summary(study, base_preset: str) -> dict:
    """Best value and params, the baseline (untuned preset) value, and trial counts."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        raise PipelineError("the study has no completed trial yet; raise tune.n_trials or tune.timeout_s")
    best = max(complete, key=lambda t: t.value)
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


def best_overrides(study, space: dict) -> dict:
    best = max((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    return {name: decode_choice(value, space[name].choices) if isinstance(space.get(name), Choice) else value
            for name, value in best.params.items() if name in space}


def best_params_record(summary: dict, overrides: dict) -> dict:
    """What `train` reads, and nothing that changes while the best trial stays the same (trial counts
    live in the summary), so more trials that find nothing better do not re-run `train`."""
    return {"study_name": summary["study_name"], "base_preset": summary["base_preset"],
            "best_trial": summary["best_trial"], "params": overrides}


def summary_metrics(summary: dict) -> dict:
    """The summary as DVC metrics: the study, best and baseline values, trial counts (the best values
    themselves are in best_params.json)."""
    return {key: summary[key] for key in ("study_name", "best_value", "best_trial", "baseline_value", "trials")}


def write_json(content: dict, output: Path) -> None:
    """Write `content` to `output` whole or not at all (a temporary file renamed into place)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2))
    os.replace(temporary, output)


def write_results(study, params: Params) -> dict:
    """The best params (`tune.output`) and the study's summary (`tune.summary`); returns the summary."""
    summary = study_summary(study, params.tune.base_preset)
    write_json(summary_metrics(summary), Path(params.tune.summary))
    write_json(best_params_record(summary, best_overrides(study, params.tune.space)), Path(params.tune.output))
    return summary


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


def optimize(study, params: Params, budget: int, parent_run_id: str | None, n_trials: int | None = None,
             timeout_s: int | None = None) -> None:
    """Run trials in this process until the study holds `budget` finished trials (shared by all
    workers of the study), or `n_trials` here, or the timeout."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.INFO)
    study.optimize(
        Objective(params, tuning_data(params), parent_run_id), n_trials=n_trials, timeout=timeout_s or None,
        callbacks=[MaxTrialsCallback(budget, states=(TrialState.COMPLETE, TrialState.PRUNED))],
        gc_after_trial=True, catch=(),
    )


def worker_threads(workers: int, cores: int | None = None) -> int:
    """TF threads per worker so that workers x threads <= cores."""
    return max(1, (cores or os.cpu_count() or 1) // max(workers, 1))


def launch_workers(params_path: str, workers: int, budget: int, parent_run_id: str) -> list[int]:
    """Start local `tune-worker` processes on the study and wait; returns their exit codes."""
    import subprocess
    import sys

    threads = worker_threads(workers)
    command = [sys.executable, "-m", "pipeline.tune", "--worker", "--params", params_path,
               "--budget", str(budget), "--parent-run-id", parent_run_id, "--threads", str(threads)]
    log.info("starting %d workers with %d TF threads each", workers, threads)
    processes = [subprocess.Popen(command) for _ in range(workers)]
    return [process.wait() for process in processes]


def run_session(params: Params, n_trials: int, timeout_s: int | None = None, study=None,
                workers: int = 1, params_path: str = "params.yaml") -> dict:
    """Run up to `n_trials` more trials under one MLflow parent run (in this process or in
    `workers` local worker processes); returns the study summary."""
    import mlflow

    from pipeline import tracking

    study = study or open_study(params)
    tune = params.tune
    if tune.enqueue_preset and not study.trials:
        baseline = baseline_params(params.presets[tune.base_preset], tune.space)
        if baseline:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
        else:
            log.warning("preset %s lies outside tune.space: no baseline trial to compare with", tune.base_preset)
    tracking.ensure_experiment(params.tracking.experiment)
    if closed := close_failed_trial_runs(study):
        log.info("marked %d MLflow trial run(s) of dead workers as FAILED", closed)
    budget = finished_trials(study) + n_trials
    with mlflow.start_run(run_name=f"study {study.study_name}",
                          tags={**tracking.run_tags("tune-study", params_hash(params)),
                                "optuna.study": study.study_name, "optuna.storage": tune.storage}) as parent:
        mlflow.log_params({"n_trials": n_trials, "pruner": tune.pruner, "tune_epochs": tune.epochs,
                           "train_images": tune.train_images, "val_images": tune.val_images, "workers": workers,
                           "base_preset": tune.base_preset, "space": json.dumps(
                               {k: v.model_dump() for k, v in tune.space.items()})})
        log.info("study %s: %d finished trials, running up to %d more", study.study_name, finished_trials(study), n_trials)
        if workers > 1:
            codes = launch_workers(params_path, workers, budget, parent.info.run_id)
            if finished_trials(study) < budget and any(codes):
                raise PipelineError(f"tuning workers exited with {codes} before the study reached {budget} trials; "
                                    "see their output above, then re-run to resume")
        else:
            optimize(study, params, budget, parent.info.run_id, n_trials, timeout_s)
        summary = study_summary(study, tune.base_preset)
        log_summary(study, summary)
    return summary


def log_summary(study, summary: dict) -> None:
    """The parent run's record: best value and params, baseline, trial counts and Optuna's figures."""
    import mlflow

    mlflow.log_metrics({"best_val_accuracy": summary["best_value"],
                        **{f"trials_{state.lower()}": n for state, n in summary["trials"].items()}})
    if summary["baseline_value"] is not None:
        mlflow.log_metric("baseline_val_accuracy", summary["baseline_value"])
    mlflow.log_params({f"best.{k}": v for k, v in summary["trial_params"].items()})
    with tempfile.TemporaryDirectory() as tmp:
        for path in log_study_figures(study, Path(tmp)):
            mlflow.log_artifact(str(path), "figures")
    mlflow.log_dict(summary, "study_summary.json")


def run_worker(params: Params, budget: int | None, parent_run_id: str | None) -> None:
    """One worker of a shared study (any machine): trials until the study-wide budget is reached."""
    from pipeline import tracking

    study = open_study(params, create=False, sampler_offset=os.getpid())
    tracking.ensure_experiment(params.tracking.experiment)
    budget = budget or params.tune.n_trials
    log.info("worker %d joins study %s (%d/%d finished)", os.getpid(), study.study_name,
             finished_trials(study), budget)
    optimize(study, params, budget, parent_run_id, timeout_s=params.tune.timeout_s)


def describe(summary: dict) -> str:
    baseline = summary["baseline_value"]
    versus = f" vs untuned preset {baseline:.4f} ({summary['best_value'] - baseline:+.4f})" if baseline is not None else ""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary["trials"].items()))
    return f"best val_accuracy {summary['best_value']:.4f} (trial {summary['best_trial']}){versus}; trials: {counts}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline tune", description=__doc__.splitlines()[0])
    parser.add_argument("--more", type=int, default=0, metavar="N",
                        help="add N trials to the existing study beyond tune.n_trials")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="run the study in N local worker processes (default: tune.workers)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    worker = parser.add_argument_group("worker mode (`python -m pipeline tune-worker`)")
    worker.add_argument("--worker", action="store_true", help="join an existing study as one worker")
    worker.add_argument("--budget", type=int, default=0, help="finished trials the whole study stops at")
    worker.add_argument("--parent-run-id", default=None, help="MLflow run that trial runs nest under")
    worker.add_argument("--threads", type=int, default=0, help="TF threads for this worker (0: runtime params)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    validate_space(params.presets[params.tune.base_preset], params.tune.space)
    if args.more < 0 or args.workers < 0:
        raise PipelineError("--more and --workers take positive numbers")
    runtime = params.runtime
    if args.threads:
        runtime = runtime.model_copy(update={"intra_op_threads": args.threads, "inter_op_threads": 1})
    setup_tensorflow(runtime, params.seed)
    if args.worker:
        run_worker(params, args.budget, args.parent_run_id)
        return
    study = open_study(params)
    remaining = args.more if args.more else max(params.tune.n_trials - finished_trials(study), 0)
    if remaining:
        run_session(params, remaining, params.tune.timeout_s, study,
                    workers=args.workers or params.tune.workers, params_path=args.params)
    else:
        log.info("study %s already has %d finished trials (tune.n_trials=%d); nothing to run",
                 study.study_name, finished_trials(study), params.tune.n_trials)
    summary = write_results(study, params)
    log.info("%s; wrote %s and %s", describe(summary), params.tune.output, params.tune.summary)


def worker_main(argv: list[str] | None = None) -> None:
    """`python -m pipeline tune-worker`: one worker joining the study named in params.yaml."""
    main(["--worker", *(argv or [])])


if __name__ == "__main__":
    main()

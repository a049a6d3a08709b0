"""Study sessions: trials in this process or in local worker processes, under one MLflow parent
run that records the study's result and Optuna's figures."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from pipeline.core.config import Params, params_hash
from pipeline.core.errors import PipelineError, redact
from pipeline.tuning.objective import Objective, tuning_data
from pipeline.tuning.space import baseline_params
from pipeline.tuning.study import (
    close_failed_trial_runs,
    finished_trials,
    log_study_figures,
    open_study,
    study_summary,
)

log = logging.getLogger("pipeline.tuning")

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

    from pipeline.core import tracking

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
                                "optuna.study": study.study_name, "optuna.storage": redact(tune.storage)}) as parent:
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
    from pipeline.core import tracking

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

"""Accuracy benchmark: a preset (default `accurate`) trained exactly as `train` trains it, over several
seeds, and the ensemble of those seeds' models as the one averaging model `train.members` saves.

Each seed trains in a freshly spawned process with the pipeline's own `fit`: early stopping on
validation accuracy with the best validation epoch's weights restored, so no figure here picks
weights on the test split. The test split and the handwriting set are scored once, after training.
A last process loads the seeds' saved models, joins them with `core.ensemble.average_members`
and scores that model the same way.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.training import EVAL_BATCH_SIZE, run_in_fresh_process
from pipeline.core.config import Params, Recipe, RuntimeParams
from pipeline.core.errors import PipelineError

log = logging.getLogger("bench.accuracy")


@dataclass(frozen=True)
class AccuracyJob:
    """One seed's training; crosses the process boundary by pickling."""

    preset: str
    recipe: Recipe
    epochs: int
    patience: int
    runtime: RuntimeParams
    seed: int
    data_seed: int  # picks the stratified subsets, the same for every seed
    train_split: str
    val_split: str
    test_split: str
    handwriting_set: str
    train_limit: int
    test_limit: int
    model_path: str  # where the process saves its float32 inference model, for the ensemble


def accuracy_jobs(params: Params, preset: str, seeds: list[int], epochs: int, patience: int, train_limit: int,
                  test_limit: int, models_dir: Path) -> list[AccuracyJob]:
    if preset not in params.presets:
        raise PipelineError(f"params.yaml has no `presets.{preset}`; pick one of {sorted(params.presets)} with --preset")
    paths = params.paths
    return [AccuracyJob(preset=preset, recipe=params.presets[preset], epochs=epochs, patience=patience,
                        runtime=params.runtime, seed=seed, data_seed=params.seed, train_split=paths.train_split,
                        val_split=paths.val_split, test_split=paths.test_split, handwriting_set=paths.handwriting_set,
                        train_limit=train_limit, test_limit=test_limit,
                        model_path=str(models_dir / f"seed{seed}.keras"))
            for seed in seeds]


def load_test(job: AccuracyJob):
    """The test split (or its stratified subset) every seed and the ensemble are scored on."""
    from pipeline.core.data import load_split, stratified_take

    return stratified_take(load_split(job.test_split), job.test_limit, job.data_seed)


def score_model(model, test, handwriting_set: str) -> dict:
    """Test accuracy and errors, and accuracy on the handwriting set, of a float32 Keras model."""
    from pipeline.core.scoring import predict_probabilities
    from pipeline.serving.handwriting import score_folder

    predicted = predict_probabilities(model, test.x, EVAL_BATCH_SIZE).argmax(axis=1)
    errors = int((predicted != test.y).sum())
    return {"test_accuracy": 1 - errors / len(test), "test_errors": errors,
            "handwriting_accuracy": score_folder(model, handwriting_set)["accuracy"]}


def train_seed(job: AccuracyJob) -> dict:
    """Train one seed as `train` does, save its model to `job.model_path`, score it."""
    from bench.machine import framework_versions
    from pipeline.core.data import load_split, stratified_take
    from pipeline.core.data import as_model_input
    from pipeline.core.runtime import dtype_policy, setup_logging, setup_tensorflow

    setup_logging()
    setup_tensorflow(job.runtime, job.seed)
    from pipeline.core.export import float32_clone
    from pipeline.core.training import fit

    train = stratified_take(load_split(job.train_split), job.train_limit, job.data_seed)
    val = load_split(job.val_split)
    test = load_test(job)
    log.info("seed %d: preset %s, up to %d epochs (patience %d) on %d images", job.seed, job.preset, job.epochs,
             job.patience, len(train))
    started = time.perf_counter()
    model, history = fit(job.recipe, job.epochs, job.patience, as_model_input(train.x), train.y,
                         as_model_input(val.x), val.y, job.seed)
    train_seconds = time.perf_counter() - started
    best = max(history, key=lambda row: row["val_accuracy"])
    model = float32_clone(model)
    model.save(job.model_path)
    scores = score_model(model, test, job.handwriting_set)
    log.info("seed %d: %.1f s, best validation epoch %d of %d, test accuracy %.4f, handwriting %.4f", job.seed,
             train_seconds, best["epoch"], len(history), scores["test_accuracy"], scores["handwriting_accuracy"])
    return {"seed": job.seed, "train_seconds": round(train_seconds, 1), "epochs_run": len(history),
            "best_epoch": int(best["epoch"]), "best_val_accuracy": best["val_accuracy"], **scores,
            "parameters": model.count_params(), "dtype_policy": dtype_policy(job.runtime),
            "train_images": len(train), "val_images": len(val), "test_images": len(test),
            "versions": framework_versions()}


def score_ensemble(jobs: list[AccuracyJob]) -> dict:
    """The seeds' saved models joined as one averaging model (what `train.members` saves), scored."""
    from pipeline.core.runtime import setup_logging, setup_tensorflow

    first = jobs[0]
    setup_logging()
    setup_tensorflow(first.runtime, first.seed)
    from pipeline.core.ensemble import average_members
    from pipeline.core.export import float32_clone
    from pipeline.core.scoring import load_keras_model

    model = float32_clone(average_members([load_keras_model(Path(job.model_path)) for job in jobs]))
    test = load_test(first)
    return {"members": len(jobs), "seeds": [job.seed for job in jobs], "parameters": model.count_params(),
            **score_model(model, test, first.handwriting_set)}


def summarize(seeds: list[dict]) -> dict:
    accuracies = [row["test_accuracy"] for row in seeds]
    return {
        "mean_test_accuracy": statistics.fmean(accuracies),
        "stdev_test_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "mean_handwriting_accuracy": statistics.fmean(row["handwriting_accuracy"] for row in seeds),
        "mean_train_seconds": statistics.fmean(row["train_seconds"] for row in seeds),
        "max_train_seconds": max(row["train_seconds"] for row in seeds),
    }


def run_accuracy_benchmark(params: Params, preset: str, seeds: list[int], epochs: int, patience: int,
                           train_limit: int = 0, test_limit: int = 0, keep_models: Path | None = None) -> dict:
    """`keep_models`: a new folder to keep the seeds' models in (seed<N>.keras); by default they are
    made in a temporary folder and removed."""
    from bench.machine import load_average_1m, machine_info

    machine = machine_info()
    if keep_models is not None:
        if keep_models.exists():  # a new folder: nothing of the user's is overwritten
            raise PipelineError(f"--keep-models {keep_models} already exists; name a folder that does not")
        keep_models.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as scratch:
        models_dir = keep_models or Path(scratch)
        jobs = accuracy_jobs(params, preset, seeds, epochs, patience, train_limit, test_limit, models_dir)
        rows = []
        for number, job in enumerate(jobs, 1):
            log.info("seed %d of %d (seed %d), in a fresh process", number, len(jobs), job.seed)
            rows.append(run_in_fresh_process(train_seed, job))
        ensemble = None
        if len(jobs) > 1:
            log.info("the ensemble of the %d seeds' models, in a fresh process", len(jobs))
            ensemble = run_in_fresh_process(score_ensemble, jobs)
    first = rows[0]
    return {
        "benchmark": "accuracy",
        "machine": {**machine, **first.pop("versions"), "load_average_1m_at_end": load_average_1m()},
        "settings": {"preset": preset, "recipe": params.presets[preset].model_dump(), "epochs": epochs,
                     "patience": patience, "seeds": seeds, "dtype_policy": first["dtype_policy"],
                     "runtime": params.runtime.model_dump(), "train_images": first["train_images"],
                     "val_images": first["val_images"], "test_images": first["test_images"],
                     "weights": "best validation epoch (early stopping on val_accuracy, best weights restored)"},
        "seeds": [{key: value for key, value in row.items() if key != "versions"} for row in rows],
        **summarize(rows),
        "ensemble": ensemble,
    }

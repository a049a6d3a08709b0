"""Training and inference benchmark: the reference preset against the project's default recipe.

Each model trains in its own freshly spawned process (see `run_in_fresh_process`), so its
peak-memory figure is its own, neither run inherits the other's warm TensorFlow state, and a
mixed-precision policy cannot leak from one to the other. The parent process never imports
TensorFlow.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.config import Params, Recipe, RuntimeParams
from pipeline.core.errors import PipelineError

log = logging.getLogger("bench.train")

REFERENCE = "reference"
THRESHOLDS = (0.990, 0.995)
BATCH_SIZES = (1, 32, 1000)
EVAL_BATCH_SIZE = 1000


@dataclass(frozen=True)
class TrainJob:
    """Everything one training process needs; crosses the process boundary by pickling."""

    role: str  # "reference" or "default"
    preset: str
    tuned: bool
    recipe: Recipe
    epochs: int
    dtype_policy: str  # "float32" or "mixed_bfloat16"
    runtime: RuntimeParams
    seed: int
    train_split: str
    test_split: str
    train_limit: int
    test_limit: int
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    inference_seconds: float = 2.0  # 0: no inference timing
    stop_at: float | None = None  # stop after the first epoch whose test accuracy reaches this


# ---- pure pieces ------------------------------------------------------------------------------

def threshold_key(threshold: float) -> str:
    """0.99 -> '99.0', 0.995 -> '99.5'."""
    return f"{threshold * 100:.1f}"


def first_reaching(accuracies: list[float], seconds: list[float], threshold: float) -> dict:
    """Epochs and cumulative training seconds when test accuracy first reached `threshold`."""
    for epoch, (accuracy, elapsed) in enumerate(zip(accuracies, seconds), start=1):
        if accuracy >= threshold - 1e-12:
            return {"epochs": epoch, "seconds": round(elapsed, 3)}
    return {"epochs": None, "seconds": None}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def inference_throughput(predict: Callable[[np.ndarray], object], images: np.ndarray, batch_sizes: tuple[int, ...],
                         min_seconds: float, warmup_calls: int = 3, min_calls: int = 5) -> dict[str, dict]:
    """Images per second of `predict` on fixed batches: warm up, then call it until `min_seconds`
    and `min_calls` are both reached. Batches larger than `images` repeat images."""
    results = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])))
        for _ in range(warmup_calls):  # traces the function for this shape
            predict(batch)
        calls, started = 0, time.perf_counter()
        while True:
            predict(batch)
            calls += 1
            elapsed = time.perf_counter() - started
            if calls >= min_calls and elapsed >= min_seconds:
                break
        results[str(size)] = {"images_per_s": round(calls * size / elapsed, 1),
                              "ms_per_batch": round(1000 * elapsed / calls, 3), "calls": calls}
    return results


def served_throughput(model, images: np.ndarray, batch_sizes: tuple[int, ...], min_seconds: float) -> dict[str, dict]:
    """`inference_throughput` of the fast serving path: the model's float32 ONNX export on ONNX Runtime,
    exactly as `serve`, `web` and `predict` run it."""
    from pipeline.core.export import export_onnx, float32_clone
    from pipeline.serving.classifier import OnnxClassifier

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        classifier = OnnxClassifier(export_onnx(float32_clone(model), Path(scratch) / "model.onnx"))
    return inference_throughput(classifier.probabilities, images, batch_sizes, min_seconds)


# ---- the training process ------------------------------------------------------------------------

def make_test_clock(x_test: np.ndarray, y_test: np.ndarray, stop_at: float | None = None):
    """A Keras callback that, at every epoch end, notes the cumulative training time since training
    began *before* scoring the test split (model.predict), then keeps the scoring time out of later
    readings; with `stop_at`, training stops once the test accuracy reaches it."""
    import keras

    class TestClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.started = 0.0
            self.evaluation_seconds = 0.0
            self.train_seconds: list[float] = []
            self.test_accuracy: list[float] = []

        def on_train_begin(self, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            self.train_seconds.append(now - self.started - self.evaluation_seconds)
            probabilities = self.model.predict(x_test, batch_size=EVAL_BATCH_SIZE, verbose=0)
            accuracy = float((np.argmax(probabilities, axis=1) == y_test).mean())
            self.test_accuracy.append(accuracy)
            self.evaluation_seconds += time.perf_counter() - now
            log.info("epoch %d: %.1f s of training, test accuracy %.4f", epoch + 1, self.train_seconds[-1], accuracy)
            if stop_at is not None and accuracy >= stop_at:
                self.model.stop_training = True

    return TestClock()


def run_job(job: TrainJob) -> dict:
    """Train one model for `job.epochs`, scoring the test split after each epoch; then time inference.

    Runs in a fresh process and sets up logging, threads and seeds exactly as the pipeline does.
    """
    from bench.machine import framework_versions, peak_rss_mib
    from pipeline.core.data import load_split, stratified_take
    from pipeline.core.data import as_model_input
    from pipeline.core.runtime import setup_logging, setup_tensorflow

    setup_logging()
    setup_tensorflow(job.runtime, job.seed)
    import keras
    import tensorflow as tf

    from pipeline.core.training import fit

    train = stratified_take(load_split(job.train_split), job.train_limit, job.seed)
    test = stratified_take(load_split(job.test_split), job.test_limit, job.seed)
    x_train, x_test = as_model_input(train.x), as_model_input(test.x)
    rss_after_setup = peak_rss_mib()  # TensorFlow loaded, data in memory, no model yet

    keras.mixed_precision.set_global_policy(job.dtype_policy)  # overrides the one setup_tensorflow chose
    try:
        clock = make_test_clock(x_test, test.y, job.stop_at)
        log.info("%s: preset %s%s, %d epochs on %d images, %s", job.role, job.preset, " (tuned)" if job.tuned else "",
                 job.epochs, len(train), job.dtype_policy)
        model, _ = fit(job.recipe, job.epochs, None, x_train, train.y, seed=job.seed, callbacks=[clock], verbose=0)
        train_seconds = clock.train_seconds[-1]  # at the last epoch's end, like every per-epoch reading
        peak_rss_train = peak_rss_mib()  # model: the inference model train saves and serves
        inference = keras_predict = served = None
        if job.inference_seconds > 0:
            inference = inference_throughput(model.predict_on_batch, x_test, job.batch_sizes, job.inference_seconds)
            keras_predict = inference_throughput(lambda batch: model.predict(batch, verbose=0), x_test, (1,),
                                                 job.inference_seconds)["1"]
            served = served_throughput(model, x_test, job.batch_sizes, job.inference_seconds)
        parameters = model.count_params()
    finally:
        keras.mixed_precision.set_global_policy("float32")

    per_epoch = [b - a for a, b in zip([0.0, *clock.train_seconds], clock.train_seconds)]
    trained = len(per_epoch)  # job.epochs, or fewer when `stop_at` was reached
    return {
        "role": job.role,
        "preset": job.preset,
        "tuned": job.tuned,
        "recipe": job.recipe.model_dump(),
        "dtype_policy": job.dtype_policy,
        "parameters": parameters,
        "train_images": len(train),
        "test_images": len(test),
        "epochs": trained,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / trained, 3),
        "seconds_per_epoch_after_first": round(sum(per_epoch[1:]) / (trained - 1), 3) if trained > 1 else None,
        "test_evaluation_seconds_excluded": round(clock.evaluation_seconds, 3),
        "train_seconds_by_epoch": [round(s, 3) for s in clock.train_seconds],
        "test_accuracy_by_epoch": [round(a, 5) for a in clock.test_accuracy],
        "final_test_accuracy": clock.test_accuracy[-1],
        "best_test_accuracy": max(clock.test_accuracy),
        "to_accuracy": {threshold_key(t): first_reaching(clock.test_accuracy, clock.train_seconds, t) for t in THRESHOLDS},
        "memory": {
            "method": "resource.getrusage(RUSAGE_SELF).ru_maxrss of this model's own process",
            "rss_after_setup_mib": rss_after_setup,
            "peak_rss_training_mib": peak_rss_train,
            "peak_rss_growth_training_mib": round(peak_rss_train - rss_after_setup, 1),
        },
        "inference": inference,
        "inference_predict_batch_1": keras_predict,  # model.predict, one image per call
        "inference_served": served,  # the ONNX file serve, web and predict run
        "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "versions": framework_versions(),
    }


def run_in_fresh_process(function: Callable, *args):
    """Call `function(*args)` in a newly spawned Python process and return its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context,
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        return pool.submit(function, *args).result()


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Worker initializer: end this process once the benchmark that spawned it is gone (say, killed
    by `kill`, which does not reach its children), rather than train on unseen and skew the timings
    of whatever runs next."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# ---- the benchmark -------------------------------------------------------------------------------

def default_recipe(params: Params, tuned_file: Path) -> tuple[Recipe, bool]:
    """The recipe `dvc repro train` would use: the preset, with the tuned params when enabled and present."""
    from pipeline.core.recipes import read_best_params, resolve_recipe

    best = read_best_params(tuned_file) if params.train.use_tuned and tuned_file.is_file() else None
    return resolve_recipe(params, best), best is not None


def default_dtype_policy(params: Params) -> str:
    """The dtype policy `dvc repro train` trains with (`runtime.precision`; "auto" picks bf16 on CPUs
    with native bf16)."""
    from pipeline.core.runtime import dtype_policy

    return dtype_policy(params.runtime)


def make_jobs(params: Params, epochs_reference: int, epochs_default: int | None, train_limit: int,
              test_limit: int, inference_seconds: float) -> list[TrainJob]:
    if REFERENCE not in params.presets:
        raise PipelineError(f"params.yaml has no `presets.{REFERENCE}`; the benchmark compares against it")
    recipe, tuned = default_recipe(params, Path(params.paths.best_params))
    common = dict(runtime=params.runtime, seed=params.seed, train_split=params.paths.train_split,
                  test_split=params.paths.test_split,
                  train_limit=train_limit, test_limit=test_limit, inference_seconds=inference_seconds)
    return [
        TrainJob(role="reference", preset=REFERENCE, tuned=False, recipe=params.presets[REFERENCE],
                 epochs=epochs_reference, dtype_policy="float32", **common),  # as the seeds measured it
        TrainJob(role="default", preset=params.train.preset, tuned=tuned, recipe=recipe,
                 epochs=epochs_default or params.train.epochs, dtype_policy=default_dtype_policy(params), **common),
    ]


def compare(reference: dict, default: dict) -> dict:
    """default / reference for every time, memory and throughput figure."""
    ratios = {f"time_to_{key.replace('.', '_')}": ratio(default["to_accuracy"][key]["seconds"],
                                                       reference["to_accuracy"][key]["seconds"])
              for key in reference["to_accuracy"]}
    ratios.update(
        train_seconds=ratio(default["train_seconds"], reference["train_seconds"]),
        seconds_per_epoch=ratio(default["seconds_per_epoch"], reference["seconds_per_epoch"]),
        peak_rss_growth_training=ratio(default["memory"]["peak_rss_growth_training_mib"],
                                       reference["memory"]["peak_rss_growth_training_mib"]),
        inference_images_per_s={size: ratio(default["inference"][size]["images_per_s"], row["images_per_s"])
                                for size, row in reference["inference"].items()},
        # the served path at batch 1 against the reference's plain `predict`
        served_batch_1_over_reference_predict=ratio(default["inference_served"]["1"]["images_per_s"],
                                                    reference["inference_predict_batch_1"]["images_per_s"]),
    )
    return ratios


def run_train_benchmark(params: Params, jobs: list[TrainJob]) -> dict:
    """Train every job in its own process, one after the other; returns the results record."""
    from bench.machine import load_average_1m, machine_info

    machine = machine_info()
    models = {}
    for job in jobs:
        log.info("training %s (preset %s) in a fresh process", job.role, job.preset)
        models[job.role] = run_in_fresh_process(run_job, job)
    first = next(iter(models.values()))
    return {
        "benchmark": "train",
        "machine": {**machine, **first["versions"], "load_average_1m_at_end": load_average_1m()},
        "settings": {
            "seed": params.seed,
            "runtime": params.runtime.model_dump(),
            "train_images": first["train_images"],
            "test_images": first["test_images"],
            "inference_batch_sizes": list(jobs[0].batch_sizes),
            "inference_seconds_per_batch_size": jobs[0].inference_seconds,
        },
        "models": models,
        "ratios_default_over_reference": compare(models["reference"], models["default"]),
    }

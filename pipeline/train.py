"""Stage 4 (after tune): fit the CNN on the training split, track it in MLflow, save the model.

Writes `models/model.keras`, `models/train_run.json` (the MLflow run and model URIs that
`evaluate` continues) and `metrics/train_history.csv` (per-epoch curves for `dvc plots`).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import Params, Recipe, TrainParams, load_params, params_hash
from pipeline.errors import PipelineError, exit_on_user_error
from pipeline.paths import publish
from pipeline.runtime import setup_logging, setup_tensorflow

log = logging.getLogger("pipeline.train")

MODEL_FILE = "model.keras"
RUN_FILE = "train_run.json"
HISTORY_FILE = "train_history.csv"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


def as_model_input(x: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) pixels to the float32 (N, 28, 28, 1) raw 0-255 tensor every model takes."""
    return x.astype(np.float32).reshape(-1, 28, 28, 1)


def read_best_params(path: Path) -> dict:
    """The tune stage's result: {"base_preset": ..., "params": {...}}; clear errors when damaged."""
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing; run `dvc repro tune` first, or set train.use_tuned=false"
        )
    try:
        content = json.loads(path.read_text())
        if not isinstance(content, dict) or not isinstance(content.get("params"), dict):
            raise ValueError("expected an object with a 'params' object")
    except (ValueError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is damaged ({error}); re-create it with `dvc repro -f tune`") from None
    return content


def resolve_recipe(params: Params, best_params: dict | None) -> Recipe:
    """The preset, with the study's best values on top when `train.use_tuned` is set."""
    recipe = params.recipe()
    if not params.train.use_tuned or best_params is None:
        return recipe
    base = best_params.get("base_preset")
    if base != params.train.preset:
        raise PipelineError(
            f"best params were tuned for preset {base!r} but train.preset is {params.train.preset!r}; "
            f"set tune.base_preset={params.train.preset} or train.use_tuned=false"
        )
    try:
        return recipe.with_overrides(best_params["params"])
    except Exception as error:
        raise PipelineError(f"tuned params do not fit preset {base!r} ({error}); re-run `dvc repro -f tune`") from None


def make_epoch_recorder(history: list[dict[str, float]], on_epoch=None):
    """A Keras callback appending {epoch, loss, accuracy, val_*, learning_rate} per epoch."""
    import keras

    from pipeline.model import current_learning_rate

    class EpochRecorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            row["learning_rate"] = current_learning_rate(self.model.optimizer)
            history.append(row)
            if on_epoch:
                on_epoch(row)

    return EpochRecorder()


def fit(recipe: Recipe, train: TrainParams, x_train, y_train, x_val, y_val, seed: int, on_epoch=None):
    """Build, compile and fit; returns (the model to save, per-epoch history rows). Early stopping on
    val_accuracy."""
    import keras

    from pipeline.model import inference_model, prepare_training

    model, leading_callbacks = prepare_training(recipe, seed, len(x_train), train.epochs)
    history: list[dict[str, float]] = []
    callbacks = [
        *leading_callbacks,
        make_epoch_recorder(history, on_epoch),
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=train.patience, restore_best_weights=True, verbose=1
        ),
    ]
    model.fit(
        x_train, y_train, validation_data=(x_val, y_val), epochs=train.epochs,
        batch_size=recipe.batch_size, shuffle=True, callbacks=callbacks, verbose=2,
    )
    return inference_model(model, recipe), history


def model_signature():
    """float32 (-1, 28, 28, 1) raw 0-255 pixels in, 10 probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities")]),
    )


def write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


@exit_on_user_error
def main() -> None:
    setup_logging()
    params = load_params()
    setup_tensorflow(params.runtime, params.seed)

    import mlflow

    from pipeline import tracking
    from pipeline.plots import save, training_curves
    from pipeline.preprocess import load_splits

    best = read_best_params(Path(params.tune.output)) if params.train.use_tuned else None
    recipe = resolve_recipe(params, best)
    splits = load_splits(params.preprocess.output_dir, ("train", "val"))
    tracking.ensure_experiment(params.tracking.experiment)  # fails fast if the store is down

    output_dir = Path(params.train.output_dir)
    history_path = Path(params.evaluate.output_dir) / HISTORY_FILE
    with tempfile.TemporaryDirectory(prefix=".train.", dir=".") as tmp:  # same filesystem as the outputs
        staging = Path(tmp)
        run_name = f"train {params.train.preset} {time.strftime('%Y-%m-%d %H:%M:%S')}"  # seeded RNG would repeat MLflow's random names
        with mlflow.start_run(run_name=run_name, tags=tracking.run_tags("train", params_hash(params))) as run:
            mlflow.log_params({"seed": params.seed, "preset": params.train.preset, "tuned": best is not None,
                               **tracking.flatten("recipe", recipe.model_dump()),
                               **tracking.flatten("train", params.train.model_dump()),
                               "train_images": len(splits["train"]), "val_images": len(splits["val"])})
            log.info("training preset %s for up to %d epochs on %d images: %s", params.train.preset,
                     params.train.epochs, len(splits["train"]), recipe.model_dump())
            started = time.perf_counter()
            model, history = fit(
                recipe, params.train,
                as_model_input(splits["train"].x), splits["train"].y,
                as_model_input(splits["val"].x), splits["val"].y, params.seed,
                on_epoch=lambda row: mlflow.log_metrics(
                    {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])),
            )
            train_seconds = time.perf_counter() - started
            best_row = max(history, key=lambda row: row["val_accuracy"])
            mlflow.log_metrics({"train_seconds": train_seconds, "epochs_run": len(history),
                                "best_val_accuracy": best_row["val_accuracy"],
                                "model_parameters": model.count_params()})

            model.save(staging / MODEL_FILE)
            write_history_csv(history, staging / HISTORY_FILE)
            save(training_curves(history), staging / "training_curves.png")
            mlflow.log_artifact(str(staging / "training_curves.png"), "figures")
            mlflow.log_artifact(str(staging / HISTORY_FILE), "metrics")
            import mlflow.keras

            model_info = mlflow.keras.log_model(model, name="model", signature=model_signature())
            record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                      "model_uri": model_info.model_uri, "run_model_uri": f"runs:/{run.info.run_id}/model",
                      "preset": params.train.preset, "recipe": recipe.model_dump(), "epochs_run": len(history),
                      "train_seconds": round(train_seconds, 1), "best_val_accuracy": best_row["val_accuracy"]}
            (staging / RUN_FILE).write_text(json.dumps(record, indent=2))
            publish(staging, {MODEL_FILE: output_dir / MODEL_FILE, RUN_FILE: output_dir / RUN_FILE,
                              HISTORY_FILE: history_path})
    log.info("trained in %.0f s, best val_accuracy %.4f at epoch %d; MLflow run %s", train_seconds,
             best_row["val_accuracy"], best_row["epoch"], record["run_id"])


if __name__ == "__main__":
    main()

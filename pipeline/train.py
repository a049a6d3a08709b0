"""Stage 4 (after tune): fit the CNN on the training split, track it in MLflow, save the model.

Writes the model (`paths.model`), the MLflow run and model URIs that `evaluate` continues
(`paths.train_run`) and the per-epoch curves for `dvc plots` (`paths.history`).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
from pathlib import Path

from pipeline.core.config import Params, Recipe, load_stage_params, params_hash
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.paths import staged_outputs
from pipeline.core.runtime import setup_logging, setup_tensorflow

log = logging.getLogger("pipeline.train")

# the params sections this stage reads (its dvc.yaml entry lists the same)
PARAMS = ("seed", "runtime", "train", "presets", "tracking")
INPUT_EXAMPLE_IMAGES = 3  # real digits saved with the logged model as its input example


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


def write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    from pipeline.core.training import HISTORY_COLUMNS

    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    params = load_stage_params("train", PARAMS)
    setup_tensorflow(params.runtime, params.seed)

    import mlflow

    from pipeline.core import tracking
    from pipeline.core.data import load_split
    from pipeline.core.model import as_model_input, model_signature
    from pipeline.core.plots import save, training_curves
    from pipeline.core.training import fit

    paths = params.paths
    best = read_best_params(Path(paths.best_params)) if params.train.use_tuned else None
    recipe = resolve_recipe(params, best)
    train, val = load_split(paths.train_split), load_split(paths.val_split)
    tracking.ensure_experiment(params.tracking.experiment)  # fails fast if the store is down
    tracking.sample_system_metrics()

    run_name = f"train {params.train.preset} {time.strftime('%Y-%m-%d %H:%M:%S')}"  # seeded RNG would repeat MLflow's random names
    with staged_outputs() as staging, tempfile.TemporaryDirectory() as scratch, \
            mlflow.start_run(run_name=run_name, tags=tracking.run_tags("train", params_hash(params)),
                             log_system_metrics=True) as run:
        mlflow.log_params({"seed": params.seed, "preset": params.train.preset, "tuned": best is not None,
                           **tracking.flatten("recipe", recipe.model_dump()),
                           **tracking.flatten("train", params.train.model_dump()),
                           "train_images": len(train), "val_images": len(val)})
        tracking.log_split(train, paths.train_split, "mnist-train", "training")
        tracking.log_split(val, paths.val_split, "mnist-val", "validation")
        log.info("training preset %s for up to %d epochs on %d images: %s", params.train.preset,
                 params.train.epochs, len(train), recipe.model_dump())
        started = time.perf_counter()
        model, history = fit(
            recipe, params.train.epochs, params.train.patience,
            as_model_input(train.x), train.y, as_model_input(val.x), val.y, params.seed,
            on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])),
        )
        train_seconds = time.perf_counter() - started
        best_row = max(history, key=lambda row: row["val_accuracy"])
        mlflow.log_metrics({"train_seconds": train_seconds, "epochs_run": len(history),
                            "best_val_accuracy": best_row["val_accuracy"], "model_parameters": model.count_params()})

        model.save(staging.path(paths.model))
        write_history_csv(history, staging.path(paths.history))
        curves = Path(scratch) / "training_curves.png"
        save(training_curves(history), curves)
        mlflow.log_artifact(str(curves), "figures")
        mlflow.log_artifact(str(staging.path(paths.history)), "metrics")
        # the input example: validation digits (this stage never reads the test split, so that a change
        # to the test set does not retrain)
        example = as_model_input(val.x[:INPUT_EXAMPLE_IMAGES])
        model_info = tracking.log_keras_model(model, model_signature(), example)
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "model_uri": model_info.model_uri, "run_model_uri": f"runs:/{run.info.run_id}/model",
                  "preset": params.train.preset, "recipe": recipe.model_dump(), "epochs_run": len(history),
                  "train_seconds": round(train_seconds, 1), "best_val_accuracy": best_row["val_accuracy"]}
        staging.path(paths.train_run).write_text(json.dumps(record, indent=2))
    log.info("trained in %.0f s, best val_accuracy %.4f at epoch %d; MLflow run %s", train_seconds,
             best_row["val_accuracy"], best_row["epoch"], record["run_id"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

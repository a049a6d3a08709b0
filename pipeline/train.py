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
PARAMS = ("seed", "runtime", "train", "presets.${train.preset}", "tracking")  # one preset only
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


def epoch_metrics(member: int, members: int, row: dict[str, float]) -> dict[str, float]:
    """MLflow metrics for one epoch of one member (1-based): member 1's under the plain names (the run's
    curves, the rows of `paths.history`), and with several members each member's under `member<i>/`."""
    from pipeline.core.ensemble import member_name

    values = {key: value for key, value in row.items() if key != "epoch"}
    metrics = dict(values) if member == 1 else {}
    if members > 1:
        metrics.update({f"{member_name(member)}/{key}": value for key, value in values.items()})
    return metrics


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    params = load_stage_params("train", PARAMS)
    setup_tensorflow(params.runtime, params.seed)

    import mlflow

    from pipeline.core import tracking
    from pipeline.core.data import load_split
    from pipeline.core.ensemble import average_members, fit_members, member_name
    from pipeline.core.export import float32_clone, log_keras_model
    from pipeline.core.model import as_model_input, model_signature
    from pipeline.core.plots import save, training_curves

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
        members = params.train.members
        models, histories = fit_members(
            recipe, members, params.train.epochs, params.train.patience,
            as_model_input(train.x), train.y, as_model_input(val.x), val.y, params.seed,
            on_epoch=lambda member, row: mlflow.log_metrics(epoch_metrics(member, members, row), step=int(row["epoch"])),
        )
        train_seconds = time.perf_counter() - started
        history = histories[0]  # paths.history: member 1's epochs (with one member, the model's)
        best_row = max(history, key=lambda row: row["val_accuracy"])
        model = models[0] if members == 1 else average_members(models)
        mlflow.log_metrics({"train_seconds": train_seconds, "epochs_run": len(history),
                            "model_parameters": model.count_params(),
                            **({"best_val_accuracy": best_row["val_accuracy"]} if members == 1 else {})})

        model = float32_clone(model)  # bf16 speeds training only; scored, registered and served in float32
        ensemble = {}
        if members > 1:  # what the saved model scores on validation, next to each member's best epoch
            predicted = model.predict(as_model_input(val.x), batch_size=1000, verbose=0).argmax(axis=1)
            ensemble = {"members": members, "ensemble_val_accuracy": float((predicted == val.y).mean()),
                        "member_val_accuracies": [max(row["val_accuracy"] for row in rows) for rows in histories],
                        "member_epochs_run": [len(rows) for rows in histories]}
            mlflow.log_metrics({"ensemble_val_accuracy": ensemble["ensemble_val_accuracy"],
                                "best_val_accuracy": ensemble["ensemble_val_accuracy"],
                                **{f"{member_name(i)}/best_val_accuracy": accuracy
                                   for i, accuracy in enumerate(ensemble["member_val_accuracies"], start=1)},
                                **{f"{member_name(i)}/epochs_run": epochs
                                   for i, epochs in enumerate(ensemble["member_epochs_run"], start=1)}})
        model.save(staging.path(paths.model))
        write_history_csv(history, staging.path(paths.history))
        curves = Path(scratch) / "training_curves.png"
        save(training_curves(history), curves)
        mlflow.log_artifact(str(curves), "figures")
        mlflow.log_artifact(str(staging.path(paths.history)), "metrics")
        # the input example: validation digits (this stage never reads the test split, so that a change
        # to the test set does not retrain)
        example = as_model_input(val.x[:INPUT_EXAMPLE_IMAGES])
        model_info = log_keras_model(model, model_signature(), example)
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "model_uri": model_info.model_uri, "run_model_uri": f"runs:/{run.info.run_id}/model",
                  "preset": params.train.preset, "recipe": recipe.model_dump(), "epochs_run": len(history),
                  "train_seconds": round(train_seconds, 1), "best_val_accuracy": best_row["val_accuracy"]}
        if ensemble:  # the ensemble's validation score is the model's
            record.update(ensemble, best_val_accuracy=ensemble["ensemble_val_accuracy"])
        staging.path(paths.train_run).write_text(json.dumps(record, indent=2))
    if ensemble:
        log.info("trained %d members in %.0f s, val_accuracy %s, ensemble %.4f; MLflow run %s", members, train_seconds,
                 " ".join(f"{a:.4f}" for a in ensemble["member_val_accuracies"]), ensemble["ensemble_val_accuracy"],
                 record["run_id"])
    else:
        log.info("trained in %.0f s, best val_accuracy %.4f at epoch %d; MLflow run %s", train_seconds,
                 best_row["val_accuracy"], best_row["epoch"], record["run_id"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

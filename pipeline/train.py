"""Stage 4 (after tune): fit the CNN on the training split, track it in MLflow, save the model.

Writes the model (`paths.model`), the MLflow run and model URIs that `evaluate` continues
(`paths.train_run`) and the per-epoch curves for `dvc plots` (`paths.history`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from pipeline.core.config import load_stage_params, params_hash
from pipeline.core.errors import exit_on_user_error
from pipeline.core.paths import staged_outputs
from pipeline.core.recipes import read_best_params, resolve_recipe
from pipeline.core.runtime import setup_logging, setup_tensorflow

log = logging.getLogger("pipeline.train")

# the params sections this stage reads (its dvc.yaml entry lists the same)
PARAMS = ("seed", "runtime", "train", "presets.${train.preset}", "tracking")  # one preset only
INPUT_EXAMPLE_IMAGES = 3  # real digits saved with the logged model as its input example


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

    from pipeline.core import tracking, training_run
    from pipeline.core.data import load_split
    from pipeline.core.ensemble import ensemble_summary, fit_members, served_model
    from pipeline.core.export import log_keras_model
    from pipeline.core.data import as_model_input
    from pipeline.core.model import model_signature

    paths, members = params.paths, params.train.members
    best = read_best_params(Path(paths.best_params)) if params.train.use_tuned else None
    recipe = resolve_recipe(params, best)
    train, val = load_split(paths.train_split), load_split(paths.val_split)
    x_val = as_model_input(val.x)
    tracking.ensure_experiment(params.tracking.experiment)  # fails fast if the store is down
    tracking.sample_system_metrics()

    with staged_outputs() as staging, mlflow.start_run(run_name=training_run.run_name(params.train.preset),
                                                       tags=tracking.run_tags("train", params_hash(params)),
                                                       log_system_metrics=True) as run:
        training_run.log_inputs(params, recipe, best is not None, train, val)
        started = time.perf_counter()
        models, histories = fit_members(recipe, members, params.train.epochs, params.train.patience,
                                        as_model_input(train.x), train.y, x_val, val.y, params.seed,
                                        on_epoch=training_run.epoch_logger(members))
        train_seconds = time.perf_counter() - started
        model = served_model(models)
        ensemble = ensemble_summary(model, histories, x_val, val.y) if members > 1 else {}
        mlflow.log_metrics(training_run.final_metrics(model.count_params(), histories, train_seconds, ensemble))
        model.save(staging.path(paths.model))
        write_history_csv(histories[0], staging.path(paths.history))  # member 1's epochs
        mlflow.log_artifact(str(staging.path(paths.history)), "metrics")
        # the input example: validation digits (this stage never reads the test split, so that a change
        # to the test set does not retrain)
        model_info = log_keras_model(model, model_signature(), x_val[:INPUT_EXAMPLE_IMAGES])
        record = training_run.run_record(run, model_info.model_uri, params.train.preset, recipe, histories[0],
                                         train_seconds, ensemble)
        staging.path(paths.train_run).write_text(json.dumps(record, indent=2))
    log.info("%s", training_run.outcome(record, histories[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

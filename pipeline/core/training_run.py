"""What a training run records: its MLflow params, per-epoch and final metrics, and the run record
(`paths.train_run`) that `evaluate` continues."""

from __future__ import annotations

import logging
import time

from pipeline.core import tracking
from pipeline.core.config import Params, Recipe
from pipeline.core.ensemble import member_name

log = logging.getLogger("pipeline.train")


def run_name(preset: str) -> str:
    """`train <preset> <time>`: a seeded RNG would repeat MLflow's random names."""
    return f"train {preset} {time.strftime('%Y-%m-%d %H:%M:%S')}"


def log_inputs(params: Params, recipe: Recipe, tuned: bool, train, val) -> None:
    """The run's params and its two data splits (`pipeline.core.data.Split`); one log line on what trains."""
    import mlflow

    log.info("training preset %s for up to %d epochs on %d images: %s", params.train.preset,
             params.train.epochs, len(train), recipe.model_dump())

    mlflow.log_params({"seed": params.seed, "preset": params.train.preset, "tuned": tuned,
                       **tracking.flatten("recipe", recipe.model_dump()),
                       **tracking.flatten("train", params.train.model_dump()),
                       "train_images": len(train), "val_images": len(val)})
    tracking.log_split(train, params.paths.train_split, "mnist-train", "training")
    tracking.log_split(val, params.paths.val_split, "mnist-val", "validation")


def epoch_metrics(member: int, members: int, row: dict[str, float]) -> dict[str, float]:
    """MLflow metrics for one epoch of one member (1-based): member 1's under the plain names (the run's
    curves, the rows of `paths.history`), and with several members each member's under `member<i>/`."""
    values = {key: value for key, value in row.items() if key != "epoch"}
    metrics = dict(values) if member == 1 else {}
    if members > 1:
        metrics.update({f"{member_name(member)}/{key}": value for key, value in values.items()})
    return metrics


def epoch_logger(members: int):
    """`fit_members`' on_epoch(member, row): each epoch's metrics logged to the active run."""
    import mlflow

    return lambda member, row: mlflow.log_metrics(epoch_metrics(member, members, row), step=int(row["epoch"]))


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    return max(history, key=lambda row: row["val_accuracy"])


def final_metrics(parameters: int, histories: list[list[dict]], train_seconds: float, ensemble: dict) -> dict:
    """The run's summary metrics: member 1's epochs, and with an ensemble its validation score and each member's."""
    metrics = {"train_seconds": train_seconds, "epochs_run": len(histories[0]), "model_parameters": parameters}
    if not ensemble:
        return {**metrics, "best_val_accuracy": best_epoch(histories[0])["val_accuracy"]}
    return {**metrics, "ensemble_val_accuracy": ensemble["ensemble_val_accuracy"],
            "best_val_accuracy": ensemble["ensemble_val_accuracy"],
            **{f"{member_name(i)}/best_val_accuracy": accuracy
               for i, accuracy in enumerate(ensemble["member_val_accuracies"], start=1)},
            **{f"{member_name(i)}/epochs_run": epochs for i, epochs in enumerate(ensemble["member_epochs_run"], start=1)}}


def run_record(run, model_uri: str, preset: str, recipe: Recipe, history: list[dict], train_seconds: float,
               ensemble: dict) -> dict:
    """`paths.train_run`: the MLflow run and model `evaluate` continues, and what trained; with an
    ensemble, its validation score is the model's."""
    record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
              "model_uri": model_uri, "run_model_uri": f"runs:/{run.info.run_id}/model",
              "preset": preset, "recipe": recipe.model_dump(), "epochs_run": len(history),
              "train_seconds": round(train_seconds, 1), "best_val_accuracy": best_epoch(history)["val_accuracy"]}
    if ensemble:
        record.update(ensemble, best_val_accuracy=ensemble["ensemble_val_accuracy"])
    return record


def outcome(record: dict, history: list[dict]) -> str:
    """One log line on what trained."""
    if "members" in record:
        return (f"trained {record['members']} members in {record['train_seconds']:.0f} s, val_accuracy "
                f"{' '.join(f'{a:.4f}' for a in record['member_val_accuracies'])}, ensemble "
                f"{record['ensemble_val_accuracy']:.4f}; MLflow run {record['run_id']}")
    best = best_epoch(history)
    return (f"trained in {record['train_seconds']:.0f} s, best val_accuracy {best['val_accuracy']:.4f} at epoch "
            f"{best['epoch']:g}; MLflow run {record['run_id']}")

"""Stage 5: score the trained model on the test split and the handwriting set, log both to its
MLflow run, register it, and promote it to champion when it beats the current one.

Writes the DVC metrics (`paths.metrics`, `paths.per_class`, `paths.handwriting`), the confusion
rows for DVC's confusion template (`paths.confusion`) and the figures under `figures/`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.core.config import load_stage_params
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.paths import staged_outputs
from pipeline.core.runtime import setup_logging, setup_tensorflow

log = logging.getLogger("pipeline.evaluate")

# the params sections this stage reads (its dvc.yaml entry lists the same)
PARAMS = ("seed", "runtime", "evaluate", "promote", "tracking")


def write_confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(y_true.tolist(), y_pred.tolist()))


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro train` first")
    with path.open() as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def read_run_record(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro train` first")
    try:
        record = json.loads(path.read_text())
        for key in ("run_id", "model_uri"):
            if key not in record:
                raise ValueError(f"no {key!r}")
    except (ValueError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is damaged ({error}); re-create it with `dvc repro -f train`") from None
    return record


def handwriting_summary(score: dict) -> dict:
    """What `dvc metrics diff` compares: overall, by ink polarity and by digit (the per-font breakdown
    and the list of mistakes go to MLflow)."""
    return {key: score[key] for key in ("accuracy", "count", "by_polarity", "by_label")}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    params = load_stage_params("evaluate", PARAMS)
    setup_tensorflow(params.runtime, params.seed)

    import mlflow

    from pipeline.core import plots, registry, tracking
    from pipeline.core.data import load_split, split_digest
    from pipeline.core.scoring import (
        classification_metrics,
        confusion,
        flat_metrics,
        load_keras_model,
        make_scorer,
        per_class_table,
        predict_probabilities,
        worst_mistakes,
    )
    from pipeline.serving.classifier import verify_logged_model
    from pipeline.serving.handwriting import prediction_sheet, score_folder

    paths = params.paths
    record = read_run_record(Path(paths.train_run))
    history = read_history(Path(paths.history))
    test = load_split(paths.test_split)
    model = load_keras_model(Path(paths.model))
    tracking.ensure_experiment(params.tracking.experiment)
    registry.require_promotion_lock(params.promote.lock)  # refused before any work, not after registering

    probabilities = predict_probabilities(model, test.x, params.evaluate.batch_size)
    y_pred = probabilities.argmax(axis=1)
    metrics = classification_metrics(test.y, probabilities)
    digest = split_digest(test)
    mistakes = worst_mistakes(test.y, probabilities, params.evaluate.misclassified_shown)
    handwriting = score_folder(model, paths.handwriting_set)
    model_file_tags = verify_logged_model(record["model_uri"], test.x, probabilities)  # the served copy agrees

    with staged_outputs() as staging:
        summary = {k: v for k, v in metrics.items() if k != "per_class"}
        staging.path(paths.metrics).write_text(json.dumps({"test": summary, "test_images": len(test)}, indent=2))
        staging.path(paths.per_class).write_text(json.dumps(metrics["per_class"], indent=2))
        staging.path(paths.handwriting).write_text(json.dumps(handwriting_summary(handwriting), indent=2))
        write_confusion_rows(test.y, y_pred, staging.path(paths.confusion))
        plots.save(plots.confusion_heatmap(confusion(test.y, y_pred),
                                           f"Confusion matrix: test accuracy {metrics['accuracy']:.2%}"),
                   staging.path(paths.confusion_figure))
        plots.save(plots.training_curves(history), staging.path(paths.curves_figure))
        captions = [f"true {test.y[i]} / pred {y_pred[i]}\n({probabilities[i, y_pred[i]]:.2f})" for i in mistakes]
        plots.save(plots.digit_grid(test.x[mistakes], captions,
                                    f"Most confident mistakes ({metrics['errors']} of {len(test)} wrong)"),
                   staging.path(paths.mistakes_figure))
        plots.save(prediction_sheet(model, paths.handwriting_set), staging.path(paths.handwriting_figure))

        with mlflow.start_run(run_id=record["run_id"]):
            mlflow.set_tag(tracking.OWNER_TAG, tracking.process_owner())  # reopened: this process owns it now
            mlflow.log_metrics({**flat_metrics(metrics), "handwriting_accuracy": handwriting["accuracy"]})
            mlflow.log_param("test_images", len(test))
            tracking.log_split(test, paths.test_split, "mnist-test", "testing")
            tracking.log_table(per_class_table(metrics), "per_class.json")
            for key in ("confusion_figure", "curves_figure", "mistakes_figure", "handwriting_figure"):
                mlflow.log_artifact(str(staging.path(getattr(paths, key))), "figures")
            mlflow.log_dict(handwriting, "metrics/handwriting_full.json")  # by picture source, and every mistake
            for key in ("metrics", "handwriting"):  # per-class scores: the per_class.json table above
                mlflow.log_artifact(str(staging.path(getattr(paths, key))), "metrics")
            version_tags = {"test_accuracy": f"{metrics['accuracy']:.6f}", "test_loss": f"{metrics['loss']:.6f}",
                            "test_macro_f1": f"{metrics['macro_f1']:.6f}", "test_data_sha256": digest,
                            "handwriting_accuracy": f"{handwriting['accuracy']:.6f}",
                            "preset": str(record.get("preset", "")), "test_images": str(len(test)), **model_file_tags,
                            **tracking.provenance_tags(mlflow.get_run(record["run_id"]).data.tags)}
            version = registry.register(record["model_uri"], params.tracking.registered_model, record["run_id"], version_tags)
            decision = registry.promote(params.tracking.registered_model, str(version.version),
                                        params.promote.margin, digest, make_scorer(test, params.evaluate.batch_size),
                                        lock_url=params.promote.lock)
            mlflow.log_dict({"version": str(version.version), "status": decision.status, "reason": decision.reason,
                             "candidate_accuracy": decision.candidate_accuracy,
                             "champion_accuracy": decision.champion_accuracy, "margin": decision.margin},
                            "promotion.json")
            mlflow.set_tags({"registered_version": str(version.version), "promotion": decision.status})
    log.info("test accuracy %.4f (%d errors), macro F1 %.4f, handwriting %.4f; %s v%s %s: %s", metrics["accuracy"],
             metrics["errors"], metrics["macro_f1"], handwriting["accuracy"], params.tracking.registered_model,
             version.version, decision.status, decision.reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

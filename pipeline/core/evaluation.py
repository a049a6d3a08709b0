"""What `evaluate` writes and records: the DVC metric files and figures, the evaluation logged to the
training run, and the registered version's tags."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core import plots, tracking
from pipeline.core.data import Split
from pipeline.core.scoring import confusion, flat_metrics, per_class_table, worst_mistakes

Place = Callable[[str], Path]  # an output path -> where to write it (`staged_outputs().path`)
FIGURES = ("confusion_figure", "curves_figure", "mistakes_figure", "handwriting_figure")  # paths.* keys


def write_confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(y_true.tolist(), y_pred.tolist()))


def handwriting_summary(score: dict) -> dict:
    """What `dvc metrics diff` compares: overall, by ink polarity and by digit (the per-font breakdown
    and the list of mistakes go to MLflow)."""
    return {key: score[key] for key in ("accuracy", "count", "by_polarity", "by_label")}


def write_metrics(place: Place, paths, test: Split, probabilities: np.ndarray, metrics: dict, handwriting: dict,
                  ood_report: dict) -> None:
    """The DVC metrics (`paths.metrics`, `paths.per_class`, `paths.handwriting`, `paths.ood`) and confusion rows."""
    summary = {k: v for k, v in metrics.items() if k != "per_class"}
    place(paths.metrics).write_text(json.dumps({"test": summary, "test_images": len(test)}, indent=2))
    place(paths.per_class).write_text(json.dumps(metrics["per_class"], indent=2))
    # each file's figures under one key, so that `dvc exp show` columns read handwriting.accuracy,
    # digit_check.accepted.test_digits and so on
    place(paths.handwriting).write_text(json.dumps({"handwriting": handwriting_summary(handwriting)}, indent=2))
    place(paths.ood).write_text(json.dumps({"digit_check": ood_report}, indent=2))
    write_confusion_rows(test.y, probabilities.argmax(axis=1), place(paths.confusion))


def draw_figures(place: Place, paths, test: Split, probabilities: np.ndarray, metrics: dict, history: list[dict],
                 handwriting_sheet, mistakes_shown: int) -> None:
    """The figures under `figures/`: confusion matrix, training curves, most confident mistakes, and
    `handwriting_sheet` (a drawn figure)."""
    y_pred = probabilities.argmax(axis=1)
    plots.save(plots.confusion_heatmap(confusion(test.y, y_pred),
                                       f"Confusion matrix: test accuracy {metrics['accuracy']:.2%}"),
               place(paths.confusion_figure))
    plots.save(plots.training_curves(history), place(paths.curves_figure))
    mistakes = worst_mistakes(test.y, probabilities, mistakes_shown)
    captions = [f"true {test.y[i]} / pred {y_pred[i]}\n({probabilities[i, y_pred[i]]:.2f})" for i in mistakes]
    plots.save(plots.digit_grid(test.x[mistakes], captions,
                                f"Most confident mistakes ({metrics['errors']} of {len(test)} wrong)"),
               place(paths.mistakes_figure))
    plots.save(handwriting_sheet, place(paths.handwriting_figure))


VERDICT_ARTIFACTS = "digit_verdict"  # run artifact folder: <sha256 prefix>/<verdict file>, one per fitted verdict


def save_verdict(path: Path, state) -> dict[str, str]:
    """Write the fitted verdict; returns the version tags that name its run artifact and sha256."""
    from pipeline.core.hashing import sha256_file
    from pipeline.core.verdict import VERDICT_TAGS, save_state

    with path.open("wb") as stream:  # np.savez would add .npz to a name without it
        save_state(state, stream)
    digest = sha256_file(path)
    return {VERDICT_TAGS["sha256"]: digest, VERDICT_TAGS["file"]: f"{VERDICT_ARTIFACTS}/{digest[:16]}/{path.name}"}


def log_evaluation(place: Place, paths, test: Split, metrics: dict, handwriting: dict, ood_report: dict,
                   verdict_tags: dict[str, str]) -> None:
    """Into the reopened training run: scores, the test split, the per-class table, figures, metric
    files, and the digit verdict's figures and file (where `verdict_tags` says)."""
    import mlflow

    from pipeline.core.ood import run_metrics

    mlflow.set_tag(tracking.OWNER_TAG, tracking.process_owner())  # reopened: this process owns it now
    mlflow.log_metrics({**flat_metrics(metrics), "handwriting_accuracy": handwriting["accuracy"]})
    mlflow.log_param("test_images", len(test))
    tracking.log_split(test, paths.test_split, "mnist-test", "testing")
    tracking.log_table(per_class_table(metrics), "per_class.json")
    for key in FIGURES:
        mlflow.log_artifact(str(place(getattr(paths, key))), "figures")
    mlflow.log_dict(handwriting, "metrics/handwriting_full.json")  # by picture source, and every mistake
    for key in ("metrics", "handwriting", "ood"):  # per-class scores: the per_class.json table above
        mlflow.log_artifact(str(place(getattr(paths, key))), "metrics")
    mlflow.log_metrics(run_metrics(ood_report))
    log_verdict(place(paths.verdict), verdict_tags)


def log_verdict(path: Path, verdict_tags: dict[str, str]) -> None:
    """The verdict file `save_verdict` wrote, as the active run's artifact its tags name."""
    from pipeline.core.verdict import VERDICT_TAGS

    log_tagged_file(path, verdict_tags[VERDICT_TAGS["file"]])


def log_tagged_file(path: Path, artifact: str) -> None:
    """A file registered with the version (verdict, drift reference), as the active run's artifact at
    `artifact` (the path its version tag names)."""
    import mlflow

    mlflow.log_artifact(str(path), str(Path(artifact).parent))


def version_tags(metrics: dict, handwriting_accuracy: float, test_digest: str, test_images: int, train_record: dict,
                 model_file_tags: dict[str, str], run_tags: dict[str, str]) -> dict[str, str]:
    """The registered version's tags: its scores, the test data they came from, the preset trained,
    the model files' hashes and the training run's provenance."""
    preset = str(train_record.get("preset", ""))
    return {"test_accuracy": f"{metrics['accuracy']:.6f}", "test_loss": f"{metrics['loss']:.6f}",
            "test_macro_f1": f"{metrics['macro_f1']:.6f}", "test_data_sha256": test_digest,
            "handwriting_accuracy": f"{handwriting_accuracy:.6f}", "preset": preset,
            "test_images": str(test_images), **model_file_tags, **tracking.provenance_tags(run_tags)}


def log_promotion(version: str, decision) -> None:
    """The registry's decision on `version`, as `promotion.json` and run tags."""
    import mlflow

    mlflow.log_dict({"version": version, "status": decision.status, "reason": decision.reason,
                     "candidate_accuracy": decision.candidate_accuracy,
                     "champion_accuracy": decision.champion_accuracy, "margin": decision.margin},
                    "promotion.json")
    mlflow.set_tags({"registered_version": version, "promotion": decision.status})


def outcome(metrics: dict, handwriting: dict, ood_report: dict, model_name: str, version: str, decision) -> str:
    """One log line on the scores and what the registry decided."""
    return (f"test accuracy {metrics['accuracy']:.4f} ({metrics['errors']} errors), macro F1 {metrics['macro_f1']:.4f}, "
            f"handwriting {handwriting['accuracy']:.4f}; digit check accepts {ood_report['accepted']['test_digits']:.4f} "
            f"of test digits, rejects {ood_report['rejected_heldout']:.4f} of unseen non-digits; "
            f"{model_name} v{version} {decision.status}: {decision.reason}")

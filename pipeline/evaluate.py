"""Stage 5: score the trained model on the test split, log to its MLflow run, register, promote.

Writes `metrics/evaluate.json` (DVC metrics), `metrics/confusion.csv` (`actual,predicted` rows
for DVC's confusion template) and PNG figures under `figures/`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import load_params
from pipeline.errors import PipelineError, exit_on_user_error
from pipeline.paths import publish
from pipeline.runtime import setup_logging, setup_tensorflow

log = logging.getLogger("pipeline.evaluate")

METRICS_FILE = "evaluate.json"
PER_CLASS_FILE = "per_class.json"
CONFUSION_FILE = "confusion.csv"
FIGURES = ("confusion_matrix.png", "training_curves.png", "misclassified.png")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """Counts: rows are actual labels, columns predicted ones."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return matrix


def log_loss(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    picked = probabilities[np.arange(len(y_true)), y_true.astype(np.int64)]
    return float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, loss, macro and per-class precision/recall/F1 from predicted probabilities."""
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion(y_true, y_pred)
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros(10), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(10), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(10), where=denominator > 0)
    return {
        "accuracy": float(true_positive.sum() / max(len(y_true), 1)),
        "loss": log_loss(y_true, probabilities),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "errors": int(len(y_true) - true_positive.sum()),
        "per_class": {
            str(digit): {"precision": float(precision[digit]), "recall": float(recall[digit]), "f1": float(f1[digit])}
            for digit in range(10)
        },
    }


def worst_mistakes(y_true: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of misclassified items, most confident mistakes first."""
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confidence = probabilities[wrong, y_pred[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def test_data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """Identifies the test set, so a champion scored on other data gets re-scored."""
    digest = hashlib.sha256(x.tobytes())
    digest.update(y.tobytes())
    return digest.hexdigest()[:16]


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


def load_keras_model(path: Path):
    import keras

    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro train` first")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        raise PipelineError(f"{path} cannot be loaded ({type(error).__name__}); re-create it with `dvc repro -f train`") from None


def predict_probabilities(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    from pipeline.train import as_model_input

    return np.asarray(model.predict(as_model_input(x), batch_size=batch_size, verbose=0), dtype=np.float64)


def make_scorer(test, batch_size: int):
    """score(model_uri) -> test accuracy of a registered model on this test split (re-scoring a champion)."""

    def score(uri: str) -> float:
        import mlflow.keras

        model = mlflow.keras.load_model(uri)
        return classification_metrics(test.y, predict_probabilities(model, test.x, batch_size))["accuracy"]

    return score


def flat_metrics(metrics: dict, prefix: str = "test") -> dict[str, float]:
    flat = {f"{prefix}_{k}": v for k, v in metrics.items() if k != "per_class"}
    for digit, scores in metrics["per_class"].items():
        flat.update({f"{prefix}_{name}_{digit}": value for name, value in scores.items()})
    return flat


@exit_on_user_error
def main() -> None:
    setup_logging()
    params = load_params()
    setup_tensorflow(params.runtime, params.seed)

    import mlflow

    from pipeline import plots, registry, tracking
    from pipeline.preprocess import load_split

    model_dir, metrics_dir, figures_dir = (Path(params.train.output_dir), Path(params.evaluate.output_dir),
                                           Path(params.evaluate.figures_dir))
    record = read_run_record(model_dir / "train_run.json")
    history = read_history(metrics_dir / "train_history.csv")
    test = load_split(Path(params.preprocess.output_dir) / "test.npz")
    model = load_keras_model(model_dir / "model.keras")
    tracking.ensure_experiment(params.tracking.experiment)

    probabilities = predict_probabilities(model, test.x, params.evaluate.batch_size)
    y_pred = probabilities.argmax(axis=1)
    metrics = classification_metrics(test.y, probabilities)
    digest = test_data_digest(test.x, test.y)
    mistakes = worst_mistakes(test.y, probabilities, params.evaluate.misclassified_shown)

    staging = Path(tempfile.mkdtemp(prefix=".evaluate.", dir="."))
    try:
        summary = {k: v for k, v in metrics.items() if k != "per_class"}
        (staging / METRICS_FILE).write_text(json.dumps({"test": summary, "test_images": len(test)}, indent=2))
        (staging / PER_CLASS_FILE).write_text(json.dumps(metrics["per_class"], indent=2))
        write_confusion_rows(test.y, y_pred, staging / CONFUSION_FILE)
        plots.save(plots.confusion_heatmap(confusion(test.y, y_pred),
                                           f"Confusion matrix: test accuracy {metrics['accuracy']:.2%}"),
                   staging / "confusion_matrix.png")
        plots.save(plots.training_curves(history), staging / "training_curves.png")
        captions = [f"true {test.y[i]} / pred {y_pred[i]}\n({probabilities[i, y_pred[i]]:.2f})" for i in mistakes]
        plots.save(plots.digit_grid(test.x[mistakes], captions,
                                    f"Most confident mistakes ({metrics['errors']} of {len(test)} wrong)"),
                   staging / "misclassified.png")

        with mlflow.start_run(run_id=record["run_id"]):
            mlflow.log_metrics(flat_metrics(metrics))
            mlflow.log_param("test_images", len(test))
            for name in FIGURES:
                mlflow.log_artifact(str(staging / name), "figures")
            mlflow.log_artifact(str(staging / METRICS_FILE), "metrics")
            mlflow.log_artifact(str(staging / PER_CLASS_FILE), "metrics")
            version_tags = {"test_accuracy": f"{metrics['accuracy']:.6f}", "test_loss": f"{metrics['loss']:.6f}",
                            "test_macro_f1": f"{metrics['macro_f1']:.6f}", "test_data_sha256": digest,
                            "preset": str(record.get("preset", "")), "test_images": str(len(test)),
                            **tracking.provenance_tags(mlflow.get_run(record["run_id"]).data.tags)}
            version = registry.register(record["model_uri"], params.tracking.registered_model, record["run_id"], version_tags)
            decision = registry.promote(params.tracking.registered_model, str(version.version),
                                        params.promote.margin, digest, make_scorer(test, params.evaluate.batch_size))
            mlflow.log_dict({"version": str(version.version), "status": decision.status, "reason": decision.reason,
                             "candidate_accuracy": decision.candidate_accuracy,
                             "champion_accuracy": decision.champion_accuracy, "margin": decision.margin},
                            "promotion.json")
            mlflow.set_tags({"registered_version": str(version.version), "promotion": decision.status})

        publish(staging, {**{name: metrics_dir / name for name in (METRICS_FILE, PER_CLASS_FILE, CONFUSION_FILE)},
                          **{name: figures_dir / name for name in FIGURES}})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("test accuracy %.4f (%d errors), macro F1 %.4f; %s v%s %s: %s", metrics["accuracy"], metrics["errors"],
             metrics["macro_f1"], params.tracking.registered_model, version.version, decision.status, decision.reason)


if __name__ == "__main__":
    main()

"""Stage 5: score the trained model on the test split and the handwriting set, fit its digit
verdict ("is this a digit at all?") and measure it on generated non-digits, log all of it to its
MLflow run, register the model with its verdict, and promote it to champion when it beats the
current one.

Writes the DVC metrics (`paths.metrics`, `paths.per_class`, `paths.handwriting`, `paths.ood`), the
verdict (`paths.verdict`), the drift reference (`paths.monitor_reference`), the confusion rows for DVC's confusion template (`paths.confusion`) and
the figures under `figures/`.
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


def drift_reference(model, validation, users_train=None, users_holdout=None, min_feedback: int = 0):
    """What `monitor` compares the log with, as the served model answers it: the validation split; or,
    once users have labelled at least `min_feedback` pictures, those pictures (traffic as it is now,
    which this model was trained and scored on)."""
    from pipeline.monitoring.reference import reference_sample

    x, y = validation.x, validation.y
    if users_train is not None and min_feedback and len(users_train) + len(users_holdout) >= min_feedback:
        x, y = np.concatenate([users_train.x, users_holdout.x]), np.concatenate([users_train.y, users_holdout.y])
        log.info("drift reference: the %d pictures users labelled", len(y))
    answers = model.answer(x)
    return reference_sample(x, y, answers.probabilities, answers.is_digit)


def feedback_score(model, holdout, train_images: int) -> dict:
    """The DVC metric `paths.feedback_metrics`: accuracy on users' feedback holdout (null when empty)."""
    from pipeline.monitoring.feedback import holdout_accuracy

    answers = model.answer(holdout.x)
    accuracy = holdout_accuracy(holdout.y, answers.probabilities.argmax(axis=1), answers.is_digit)
    return {"holdout_accuracy": None if np.isnan(accuracy) else round(accuracy, 6), "holdout_images": len(holdout),
            "train_images": train_images}


def feedback_scorer(holdout):
    """score(model_uri) -> a registered version's accuracy on the feedback holdout (re-scoring a champion)."""
    def score(uri: str) -> float:
        from pipeline.serving.classifier import load_classifier

        accuracy = feedback_score(load_classifier(uri), holdout, 0)["holdout_accuracy"]
        return 0.0 if accuracy is None else accuracy

    return score


def feedback_tags(report: dict, holdout) -> dict[str, str]:
    from pipeline.registry.store import FEEDBACK_TAGS

    if report["holdout_accuracy"] is None:
        return {"feedback_images": "0"}
    return {FEEDBACK_TAGS[0]: f"{report['holdout_accuracy']:.6f}", FEEDBACK_TAGS[1]: holdout.digest,
            "feedback_images": str(report["holdout_images"])}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    params = load_stage_params("evaluate", PARAMS)
    setup_tensorflow(params.runtime, params.seed)

    import mlflow

    from pipeline.core import evaluation, ood, plots, tracking
    from pipeline.core.export import classifier_head
    from pipeline.registry.locks import require_promotion_lock
    from pipeline.registry.store import promote, register
    from pipeline.core.data import Split, load_split, split_digest
    from pipeline.monitoring import feedback
    from pipeline.registry.store import FeedbackHoldout
    from pipeline.core.scoring import classification_metrics, load_keras_model, make_scorer, predict_probabilities
    from pipeline.monitoring.reference import REFERENCE_TAGS, save_reference
    from pipeline.serving.classifier import verify_logged_model
    from pipeline.serving.served import ServedModel
    from pipeline.serving.handwriting import predict_folder, prediction_sheet, prepared_pixels, score

    paths = params.paths
    record = read_run_record(Path(paths.train_run))
    history = read_history(Path(paths.history))
    test = load_split(paths.test_split)
    model = load_keras_model(Path(paths.model))
    tracking.ensure_experiment(params.tracking.experiment)
    require_promotion_lock(params.promote.lock)  # refused before any work, not after registering

    probabilities = predict_probabilities(model, test.x, params.evaluate.batch_size)
    metrics = classification_metrics(test.y, probabilities)
    digest = split_digest(test)
    pictures = predict_folder(model, paths.handwriting_set)
    handwriting = score(pictures)
    model_file_tags, served = verify_logged_model(record["model_uri"], test.x, probabilities)  # the served copy agrees
    train, validation = load_split(paths.train_split), load_split(paths.val_split)
    users_train, users_holdout = feedback.load_parts(paths.feedback_split)
    state, ood_report = ood.fit_and_report(served.outputs, classifier_head(model).get_weights(), params.evaluate,
                                           params.seed, (train.x, train.y), validation.x, test.x,
                                           prepared_pixels(paths.handwriting_set), users_train.nondigits.x,
                                           (users_train.digits.x, users_train.digits.y))
    answering = ServedModel(served, state)
    reference = drift_reference(answering, validation, users_train, users_holdout, params.evaluate.reference_min_feedback)
    feedback_report = feedback_score(answering, users_holdout, len(users_train))
    holdout = FeedbackHoldout(split_digest(Split(users_holdout.x, users_holdout.y)), len(users_holdout),
                              feedback_scorer(users_holdout), params.promote.feedback_margin,
                              params.promote.min_feedback_images)

    plots.use_file_backend()
    with staged_outputs() as staging:
        evaluation.write_metrics(staging.path, paths, test, probabilities, metrics, handwriting, ood_report)
        staging.path(paths.feedback_metrics).write_text(json.dumps({"feedback": feedback_report}, indent=2))
        verdict_tags = evaluation.save_verdict(staging.path(paths.verdict), state)
        reference_tags = save_reference(reference, staging.path(paths.monitor_reference))
        evaluation.draw_figures(staging.path, paths, test, probabilities, metrics, history,
                                prediction_sheet(pictures, paths.handwriting_set), params.evaluate.misclassified_shown)
        with mlflow.start_run(run_id=record["run_id"]):
            evaluation.log_evaluation(staging.path, paths, test, metrics, handwriting, ood_report, verdict_tags)
            evaluation.log_tagged_file(staging.path(paths.monitor_reference), reference_tags[REFERENCE_TAGS["file"]])
            mlflow.log_artifact(str(staging.path(paths.feedback_metrics)), "metrics")
            mlflow.log_metrics({f"feedback_{key}": value for key, value in feedback_report.items() if value is not None})
            version_tags = evaluation.version_tags(metrics, handwriting["accuracy"], digest, len(test), record,
                                                   {**model_file_tags, **verdict_tags, **reference_tags,
                                                    **ood.version_tags(ood_report),
                                                    **feedback_tags(feedback_report, holdout)},
                                                   mlflow.get_run(record["run_id"]).data.tags)
            version = register(record["model_uri"], params.tracking.registered_model, record["run_id"], version_tags)
            decision = promote(params.tracking.registered_model, str(version.version), params.promote.margin, digest,
                               make_scorer(test, params.evaluate.batch_size), lock_url=params.promote.lock,
                               min_digit_acceptance=params.promote.min_digit_acceptance, feedback=holdout)
            evaluation.log_promotion(str(version.version), decision)
    log.info("%s", evaluation.outcome(metrics, handwriting, ood_report, params.tracking.registered_model,
                                      version.version, decision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

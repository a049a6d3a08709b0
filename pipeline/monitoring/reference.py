"""The drift reference of a registered version: pictures it was validated on, passed through the same
features and the same model (with its digit verdict) that serving logs, saved at registration.

`evaluate` writes it (`paths.monitor_reference`), logs it as a run artifact and tags the version with
its file and sha256, so `monitor` compares a window of the log with the reference of the version
that answered it, and a rollback brings back the matching reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.hashing import sha256_file, write_stable_npz
from pipeline.monitoring.drift import NO_FEEDBACK, Sample
from pipeline.monitoring.features import input_features

REFERENCE_TAGS = {"sha256": "monitor_reference_sha256", "file": "monitor_reference_file"}
REFERENCE_ARTIFACTS = "monitor_reference"  # run artifact folder: <sha256 prefix>/<file>


def reference_sample(pixels: np.ndarray, true_labels: np.ndarray, probabilities: np.ndarray,
                     is_digit: np.ndarray | None) -> Sample:
    """The reference rows: each picture's input features and the model's answer, with its true label."""
    return Sample(input_features(pixels), probabilities.argmax(axis=1), probabilities.max(axis=1), is_digit,
                  np.asarray(true_labels, dtype=np.int64))


def save_reference(sample: Sample, path: Path) -> dict[str, str]:
    """Write the reference (the same bytes for the same rows); returns the version tags naming it."""
    arrays = {"features": sample.features, "labels": sample.labels, "confidence": sample.confidence,
              "true_labels": NO_FEEDBACK * np.ones(len(sample.labels), np.int64) if sample.true_labels is None
              else sample.true_labels}
    if sample.is_digit is not None:
        arrays["is_digit"] = sample.is_digit
    with path.open("wb") as stream:
        write_stable_npz(arrays, stream)
    digest = sha256_file(path)
    return {REFERENCE_TAGS["sha256"]: digest, REFERENCE_TAGS["file"]: f"{REFERENCE_ARTIFACTS}/{digest[:16]}/{path.name}"}


def load_reference(path: Path) -> Sample:
    with np.load(path, allow_pickle=False) as data:
        return Sample(data["features"], data["labels"], data["confidence"],
                      data["is_digit"] if "is_digit" in data.files else None, data["true_labels"])


def registered_reference(version, scratch: Path) -> Sample:
    """The reference registered with a model version (`REFERENCE_TAGS`), once its sha256 matches."""
    import mlflow

    from pipeline.core.errors import PipelineError

    label = f"{version.name} version {version.version}"
    expected, artifact = (version.tags.get(REFERENCE_TAGS[key]) for key in ("sha256", "file"))
    if not expected or not artifact:
        raise PipelineError(f"{label} was registered without a drift reference; register a fresh one with "
                            "`dvc repro -f evaluate`, or monitor a newer version (--model models:/<name>/<version>)")
    path = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=str(scratch)))
    if sha256_file(path) != expected:
        raise PipelineError(f"{label}: its drift reference ({artifact}) does not match its registered sha256; the stored "
                            "file was changed after registration: register a fresh one with `dvc repro -f evaluate`")
    return load_reference(path)

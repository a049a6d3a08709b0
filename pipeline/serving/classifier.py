"""The served model: a registered version's ONNX file run by ONNX Runtime, after its hash is checked.

`serve`, `web` and `predict` share `load_classifier`:
- `models:/<name>@<alias>`, `models:/<name>/<version>` and `runs:/<run>/...` (a run's registered
  version) load the version's ONNX file, once its sha256 matches the `onnx_sha256` tag recorded
  at registration and the folder is this project's format (MLflow's Keras flavour plus the ONNX
  file). Anything else (another flavour, a pickled pyfunc, a changed file) is refused in one line.
  No TensorFlow: a server starts in about a second in under 100 MB.
- A local `.keras` file (your own) loads with Keras in safe mode.

Re-scoring a champion (`load_registered_keras`) loads a version's Keras file, once its sha256
matches the `keras_sha256` tag.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.core.data import NUM_CLASSES, as_model_input
from pipeline.core.errors import PipelineError, first_line, redact
from pipeline.core.export import (
    HASH_TAGS,
    KERAS_FILE,
    ONNX_FILE,
    check_model_file,
    compare_predictions,
    model_hashes,
)
from pipeline.core.hashing import sha256_file
from pipeline.core.verdict import VERDICT_TAGS, VerdictState, feature_width, load_state
from pipeline.serving.served import LOCAL_FILE_NOTE, NO_VERDICT_NOTE, ServedModel

log = logging.getLogger(__name__)

PROJECT_FLAVOURS = {"keras", "python_function"}


class Classifier(Protocol):
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 10) float32 softmax outputs for raw 0-255 pixels shaped (n, 28, 28) or (n, 28, 28, 1)."""


class OnnxClassifier:
    """ONNX Runtime on one thread: exact against float32 Keras and ~1,000x faster at batch 1 than
    `model.predict` (docs/fast-inference.md). `session.run` is thread-safe."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:  # threads 0: ONNX Runtime's choice
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

        self.output_names = [output.name for output in self.session.get_outputs()]

    @property
    def feature_width(self) -> int | None:
        """How many features the second output gives (None: a model exported without it)."""
        return self.session.get_outputs()[1].shape[1] if len(self.output_names) > 1 else None

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        batch = as_model_input(pixels)
        if len(batch) == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        return self.session.run(self.output_names[:1], {self.input_name: batch})[0]

    def outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, features) in one run; the features are what the digit verdict reads."""
        batch = as_model_input(pixels)
        if len(batch) == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32), np.zeros((0, self.feature_width or 0), np.float32)
        probabilities, features = self.session.run(self.output_names[:2], {self.input_name: batch})
        return probabilities, features


class KerasClassifier:
    """A Keras model behind the same interface (a local .keras file, or the model `evaluate` scores)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        batch = as_model_input(pixels)
        if len(batch) == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        if len(batch) <= 256:  # one step, without predict()'s per-call pipeline set-up
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)
        return np.asarray(self.model.predict(batch, batch_size=256, verbose=0), dtype=np.float32)


def as_classifier(model: Any) -> Classifier:
    return model if hasattr(model, "probabilities") else KerasClassifier(model)


# --- loading -------------------------------------------------------------------------------


def load_keras_file(path: Path) -> KerasClassifier:
    from pipeline.core.runtime import import_tensorflow

    import_tensorflow()
    import keras

    try:
        return KerasClassifier(keras.saving.load_model(path, safe_mode=True))
    except (ValueError, OSError) as error:
        raise PipelineError(f"{path} is not a Keras model file ({first_line(error)}); pass a .keras file") from None


def registered_version(client: Any, uri: str) -> Any:
    """The ModelVersion a `models:/` or `runs:/` URI names."""
    from pipeline.registry.store import find_version_for_run

    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
        version = find_version_for_run(client, run_id)
        if version is None:
            raise PipelineError(f"run {run_id} has no registered model version; serve a registered one "
                                "(models:/<name>@champion) so that its hash can be checked")
        return version
    name, _, selector = uri.removeprefix("models:/").partition("@")
    if selector:
        return client.get_model_version_by_alias(name, selector)
    name, _, number = name.rpartition("/")
    if not name or not number.isdigit():
        raise PipelineError(f"{uri!r} names no version; use models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, number)


def check_model_folder(folder: Path, version: Any) -> Path:
    """The ONNX file of a downloaded version folder, once its format and hash are the project's."""
    import yaml

    label = f"{version.name} version {version.version}"
    try:
        flavours = set(yaml.safe_load((folder / "MLmodel").read_text()).get("flavors", {}))
    except (OSError, yaml.YAMLError, AttributeError):
        raise PipelineError(f"{label} has no readable MLmodel file; it is not a model this project registered") from None
    if "keras" not in flavours or flavours - PROJECT_FLAVOURS or not (folder / ONNX_FILE).is_file():
        raise PipelineError(f"{label} is not this project's model format (Keras flavour with {ONNX_FILE}; "
                            f"found flavours {sorted(flavours)}); register models with `dvc repro`")
    return check_model_file(folder, ONNX_FILE, version)


def quiet_downloads() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar on a server's log


@contextmanager
def downloaded_version(client: Any, version: Any) -> Iterator[Path]:
    """A registered version's model folder, downloaded into a scratch folder removed afterwards."""
    import mlflow

    quiet_downloads()
    with tempfile.TemporaryDirectory(prefix="mnist-model-") as scratch:
        yield Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(version.name, version.version), dst_path=scratch))


def load_verdict(version: Any, classifier: OnnxClassifier, scratch: Path) -> VerdictState | None:
    """The digit verdict registered with `version` (`VERDICT_TAGS`), once its file's sha256 matches
    and it reads the features the ONNX file gives; None (with one log line) for a version
    registered before verdicts existed."""
    import mlflow

    label = f"{version.name} version {version.version}"
    expected, artifact = (version.tags.get(VERDICT_TAGS[key]) for key in ("sha256", "file"))
    if not expected or not artifact:
        log.warning("%s: %s; re-register it with `dvc repro -f evaluate` to get one", label, NO_VERDICT_NOTE)
        return None
    path = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=str(scratch)))
    if sha256_file(path) != expected:
        raise PipelineError(f"{label}: its digit verdict ({artifact}) does not match its registered sha256; the stored "
                            "file was changed after registration: do not load it, register a fresh one with "
                            "`dvc repro -f evaluate`")
    state = load_state(path)
    if classifier.feature_width != feature_width(state):
        raise PipelineError(f"{label}: its digit verdict reads {feature_width(state)} features but its ONNX file gives "
                            f"{classifier.feature_width}; register a fresh model with `dvc repro -f train`")
    return state


def load_registered(uri: str) -> ServedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.core.tracking import configure_tracking

    store = configure_tracking()  # the project's store, or MLFLOW_TRACKING_URI
    client = mlflow.MlflowClient()
    try:
        version = registered_version(client, uri)
        with downloaded_version(client, version) as folder:
            classifier = OnnxClassifier(check_model_folder(folder, version))
            state = load_verdict(version, classifier, folder)
    except (MlflowException, OSError) as error:
        raise PipelineError(
            f"cannot load model {uri!r} from MLflow at {redact(store)} ({redact(first_line(error))}); "
            "train and promote a model first, or pass --model with another models:/ URI or a .keras file"
        ) from None
    log.info("loaded %s: %s version %s (%s verified%s)", uri, version.name, version.version, HASH_TAGS[ONNX_FILE],
             ", with its digit verdict" if state else "")
    return ServedModel(classifier, state, str(version.version), NO_VERDICT_NOTE)


def load_registered_keras(uri: str) -> Any:
    """The Keras model of the registered version a `models:/` or `runs:/` URI names, once its
    `KERAS_FILE` matches the version's `keras_sha256` (re-scoring a champion)."""
    from pipeline.core.runtime import import_tensorflow

    import_tensorflow()
    import keras
    import mlflow

    client = mlflow.MlflowClient()
    version = registered_version(client, uri)
    with downloaded_version(client, version) as folder:
        return keras.saving.load_model(check_model_file(folder, KERAS_FILE, version), safe_mode=True)


def load_classifier(uri: str) -> ServedModel:
    """The model a `--model` value names: a registered version (ONNX and its digit verdict,
    hash-checked) or a .keras file (no verdict)."""
    if uri.startswith(("models:/", "runs:/")):
        return load_registered(uri)
    path = Path(uri).expanduser()
    if path.is_file():
        log.warning("%s: %s; answers carry no is_digit", path, LOCAL_FILE_NOTE)
        return ServedModel(load_keras_file(path), missing_verdict=LOCAL_FILE_NOTE)
    raise PipelineError(f"model {uri!r} not found; pass models:/<name>@<alias>, models:/<name>/<version>, "
                        "runs:/<run id>/model or a .keras file")


# --- registration --------------------------------------------------------------------------


def verify_logged_model(model_uri: str, pixels: np.ndarray,
                        keras_probabilities: np.ndarray) -> tuple[dict[str, str], OnnxClassifier]:
    """Before registration: the logged model's ONNX file must predict what the Keras model predicts
    on `pixels` (same digit for every image, probabilities within 1e-3); returns the version tags
    with both model files' sha256, hashed from the bytes just checked, and that ONNX model (on
    every core), which the digit verdict is fitted and measured through."""
    quiet_downloads()
    import mlflow

    with tempfile.TemporaryDirectory(prefix="mnist-model-") as scratch:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch))
        if not (folder / ONNX_FILE).is_file():
            raise PipelineError(f"{model_uri} holds no {ONNX_FILE}; re-train with `dvc repro -f train`")
        served = OnnxClassifier(folder / ONNX_FILE, threads=0)
        problem = compare_predictions(keras_probabilities, served.probabilities(pixels))
        if problem:
            raise PipelineError(f"the ONNX copy of {model_uri} disagrees with the Keras model on the test split "
                                f"({problem}); not registered: re-train with `dvc repro -f train`")
        if served.feature_width is None:
            raise PipelineError(f"{model_uri} was exported without the features the digit verdict reads; "
                                "re-train with `dvc repro -f train`")
        return model_hashes(folder), served

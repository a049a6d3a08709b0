"""The served form of a trained model: float32 Keras for scoring, ONNX for fast serving.

Mixed bfloat16 speeds training only. The saved model is a float32 copy (`float32_clone`), so that
the test accuracy `evaluate` reports, the Keras model in the registry and the ONNX file that
`serve`, `web` and `predict` run all compute the same function. The ONNX file travels inside the
logged MLflow model (`ONNX_FILE` beside `MLmodel`); before a version is registered,
`compare_predictions` checks it against the Keras model on the whole test split, and the version
records both files' sha256 (`HASH_TAGS`), which every loader verifies.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.data import INPUT_SHAPE
from pipeline.core.errors import PipelineError
from pipeline.core.hashing import sha256_file

ONNX_FILE = "model.onnx"
KERAS_FILE = "data/model.keras"  # where MLflow's Keras flavour keeps the model inside its folder
HASH_TAGS = {ONNX_FILE: "onnx_sha256", KERAS_FILE: "keras_sha256"}  # model file -> registry version tag
MAX_PROBABILITY_GAP = 1e-3  # ONNX Runtime vs Keras, any image and class


def model_hashes(model_folder: str | Path) -> dict[str, str]:
    """{version tag: sha256} of the model files in a downloaded MLflow model folder."""
    folder = Path(model_folder)
    return {tag: sha256_file(folder / name) for name, tag in HASH_TAGS.items()}


def check_model_file(folder: str | Path, name: str, version: Any) -> Path:
    """`folder/name` of a downloaded registered `version`, once its sha256 is the one the version
    records (`HASH_TAGS[name]`); otherwise refused in one line naming the file and the fix."""
    label, tag = f"{version.name} version {version.version}", HASH_TAGS[name]
    expected = version.tags.get(tag)
    if not expected:
        raise PipelineError(f"{label} records no {tag} tag; it was registered before models were hashed: "
                            "re-register it with `dvc repro -f evaluate`")
    path = Path(folder) / name
    if not path.is_file() or sha256_file(path) != expected:
        raise PipelineError(f"{label}: {name} does not match its registered sha256; the stored model was changed "
                            "after registration: do not load it, register a fresh one with `dvc repro -f train`")
    return path


def _float32_config(config: Any) -> Any:
    """A model config with every dtype policy (mixed_bfloat16 and the like) replaced by float32."""
    if isinstance(config, dict):
        if str(config.get("class_name", "")).endswith("DTypePolicy"):
            return "float32"
        return {key: _float32_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    return config


def float32_clone(model):
    """The same network and weights, computing in float32 (mixed-precision variables are float32)."""
    clone = model.__class__.from_config(_float32_config(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


HEAD_LAYER = "probabilities"  # the softmax layer of a single model (and of each ensemble member)


def head_owner(model):
    """The model whose softmax layer the digit verdict reads: `model` itself, or for an ensemble
    (whose output layer averages its members) its first member."""
    if model.get_layer(HEAD_LAYER).__class__.__name__ != "Average":
        return model
    return next(sub for sub in model.layers if hasattr(sub, "get_layer"))


def classifier_head(model):
    """That softmax layer."""
    return head_owner(model).get_layer(HEAD_LAYER)


STATISTICS_LAYERS = ("block1_pool", "block2_conv1")  # early layers whose channel statistics join the features


def feature_output(owner):
    """The features the digit verdict reads, for a model of `core.model`'s shape: the input of its
    softmax layer (D numbers), then the per-channel mean and standard deviation over the picture of
    each of `STATISTICS_LAYERS` that the model has (C numbers)."""
    import keras

    parts = [owner.get_layer(HEAD_LAYER).input]
    names = {layer.name for layer in owner.layers}
    for name in (name for name in STATISTICS_LAYERS if name in names):
        activation = owner.get_layer(name).output
        mean = keras.ops.mean(activation, axis=(1, 2))
        square = keras.ops.mean(keras.ops.square(activation), axis=(1, 2))
        parts += [mean, keras.ops.sqrt(keras.ops.maximum(square - keras.ops.square(mean), 0.0))]
    return parts[0] if len(parts) == 1 else keras.ops.concatenate(parts, axis=1)


def with_features(model):
    """`model` with a second output: `feature_output` of its (first member's) network."""
    import keras

    owner = head_owner(model)
    if owner is model:  # a single model: one graph computes both outputs
        return keras.Model(model.inputs, [model.outputs[0], feature_output(model)], name=model.name)
    features = keras.Model(owner.inputs, feature_output(owner), name=f"{owner.name}_features")(model.inputs[0])
    return keras.Model(model.inputs, [model.outputs[0], features], name=model.name)


def export_onnx(model, path: str | Path) -> Path:
    """Write `model` (float32) as an ONNX file taking (n, 28, 28, 1) float32 raw pixels, with two
    outputs: the probabilities and the features the digit verdict scores (`with_features`)."""
    import keras

    path = Path(path)
    with warnings.catch_warnings():  # tf2onnx probes the removed `np.object`
        warnings.simplefilter("ignore", FutureWarning)
        with_features(model).export(str(path), format="onnx", verbose=False,
                                    input_signature=[keras.InputSpec(shape=(None, *INPUT_SHAPE), dtype="float32")])
    return path


def compare_predictions(reference: np.ndarray, candidate: np.ndarray,
                        max_gap: float = MAX_PROBABILITY_GAP) -> str | None:
    """None when two (n, 10) probability arrays agree (same argmax everywhere, gap <= max_gap);
    otherwise what differs, in one line."""
    if reference.shape != candidate.shape:
        return f"shapes differ: {reference.shape} vs {candidate.shape}"
    flips = int(np.sum(reference.argmax(axis=1) != candidate.argmax(axis=1)))
    gap = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    if flips or not gap <= max_gap:
        return (f"{flips} of {len(reference)} images change their predicted digit; "
                f"largest probability gap {gap:.2g} (allowed {max_gap:g})")
    return None


SERVING_PACKAGES = ("mlflow", "keras", "tensorflow", "tensorflow-cpu", "onnxruntime")


def model_requirements() -> list[str]:
    """The logged model's pip requirements: what loads it (Keras flavour, ONNX copy), pinned to this
    environment. Given explicitly, because MLflow infers them by loading the model in a subprocess
    (about 20 s per model)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in SERVING_PACKAGES:
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:  # tensorflow-cpu on x86-64 Linux, tensorflow elsewhere
            pass
    return requirements


def log_keras_model(model, signature, input_example, name: str = "model"):
    """`mlflow.keras.log_model(model, name, signature, input_example)` plus the model as ONNX
    (`ONNX_FILE`, the fast serving path) in the same folder; returns its ModelInfo.

    MLflow's Keras flavor (3.17 and earlier) writes `input_example.json` before it creates the model
    folder, so logging an example fails (mlflow/mlflow#16183); this flavor creates the folder first.
    """
    import types

    import mlflow.keras
    from mlflow.models import Model

    def save_model(path: str, **kwargs) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)
        export_onnx(kwargs["model"], os.path.join(path, ONNX_FILE))

    flavor = types.SimpleNamespace(__name__=mlflow.keras.__name__, save_model=save_model)
    with warnings.catch_warnings():  # MLflow checks the example by predicting it as a bare array, which Keras
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")  # takes, warning
        return Model.log(artifact_path=None, name=name, flavor=flavor, model=model, signature=signature,
                         input_example=input_example, pip_requirements=model_requirements())

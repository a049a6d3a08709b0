"""Shared fixtures of the serving tests: a tiny trained model and digit pictures."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO / "data" / "raw" / "mnist.npz"
TRAIN_IMAGES = 12000
EPOCHS = 2

_cache: dict[str, Path] = {}


def train_tiny_model(mnist: Path, out: Path) -> Path:
    """The reference preset trained 2 epochs on 12,000 MNIST images (about 97 % test accuracy, a few
    seconds): good enough that tests can check every label of clear digits."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from pipeline.core.config import load_params
    from pipeline.core.model import build_model
    from pipeline.core.training import compile_model

    keras.utils.set_random_seed(0)
    with np.load(mnist) as data:
        x = data["x_train"][:TRAIN_IMAGES, ..., None].astype("float32")
        y = data["y_train"][:TRAIN_IMAGES]
    recipe = load_params(REPO / "params.yaml").recipe("reference")
    steps = int(np.ceil(len(x) / recipe.batch_size))
    model = compile_model(build_model(recipe, seed=0), recipe, steps, epochs=EPOCHS, jit_compile=False)
    model.fit(x, y, batch_size=recipe.batch_size, epochs=EPOCHS, verbose=0)
    path = out / "tiny.keras"
    model.save(path)
    return path


VERDICT_SETTINGS = SimpleNamespace(digit_verdict="combined", digit_acceptance=0.995, nondigits_per_kind=100,
                                   verdict_train_images=2000)  # evaluate's params, small


def register_model(model_path: Path, name: str, mnist: Path, artifacts: Path, verdict: bool = True) -> str:
    """Log and register a .keras file the way `train` and `evaluate` do (ONNX copy checked, hashes
    tagged, and unless `verdict` is False, a digit verdict fitted, logged and tagged) in the store
    MLFLOW_TRACKING_URI names; returns the run id."""
    import keras
    import mlflow

    from pipeline.core import evaluation, ood, tracking
    from pipeline.core.export import classifier_head
    from pipeline.registry import store as registry
    from pipeline.core.export import log_keras_model
    from pipeline.core.data import as_model_input
    from pipeline.core.model import model_signature
    from pipeline.serving.classifier import KerasClassifier, verify_logged_model
    from pipeline.serving.served import ServedModel

    tracking.configure_tracking()
    model = keras.saving.load_model(model_path)
    with np.load(mnist) as data:
        pixels = data["x_test"][:64]
    experiment = mlflow.create_experiment(f"register-{name}-{artifacts.name}", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_keras_model(model, model_signature(), as_model_input(pixels[:1]))
        tags, served = verify_logged_model(info.model_uri, pixels, KerasClassifier(model).probabilities(pixels))
        if verdict:
            with np.load(mnist) as data:
                train = data["x_train"][:TRAIN_IMAGES], data["y_train"][:TRAIN_IMAGES]
                validation, test = data["x_train"][-2000:], data["x_test"][:1000]
            state, report = ood.fit_and_report(served.outputs, classifier_head(model).get_weights(), VERDICT_SETTINGS,
                                               0, train, validation, test, (test[:100], 100))
            path = artifacts.parent / f"{artifacts.name}-verdict" / "digit_verdict.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            verdict_tags = evaluation.save_verdict(path, state)
            evaluation.log_verdict(path, verdict_tags)
            tags.update(verdict_tags, **ood.version_tags(report))
            tags.update(log_reference(ServedModel(served, state), artifacts, mnist))
    registry.register(info.model_uri, name, run.info.run_id, tags)
    return run.info.run_id


REFERENCE_IMAGES = 3000  # drawn from the training images the tiny model never saw (MNIST is ordered by writer)


def reference_split(mnist: Path):
    """Digits like evaluate's validation split: a seeded draw over the training images past TRAIN_IMAGES."""
    from pipeline.core.data import Split

    with np.load(mnist) as data:
        keep = TRAIN_IMAGES + np.random.default_rng(0).permutation(len(data["x_train"]) - TRAIN_IMAGES)[:REFERENCE_IMAGES]
        return Split(data["x_train"][keep], data["y_train"][keep])


def log_reference(model, artifacts: Path, mnist: Path) -> dict[str, str]:
    """The drift reference `evaluate` registers, from held-out digits, logged to the active run; its tags."""
    from pipeline.core.evaluation import log_tagged_file
    from pipeline.evaluate import drift_reference
    from pipeline.monitoring.reference import REFERENCE_TAGS, save_reference

    held_out = reference_split(mnist)
    path = artifacts.parent / f"{artifacts.name}-reference" / "monitor_reference.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = save_reference(drift_reference(model, held_out), path)
    log_tagged_file(path, tags[REFERENCE_TAGS["file"]])
    return tags


@pytest.fixture(scope="session")
def mnist_file(request: pytest.FixtureRequest) -> Path:
    """data/raw/mnist.npz; conftest's `mnist_npz` fetches it when absent, else the test skips."""
    try:
        path = Path(request.getfixturevalue("mnist_npz"))
    except pytest.FixtureLookupError:
        path = MNIST
    if not path.is_file():
        pytest.skip(f"{path} is absent; run `python -m pipeline.fetch` to get MNIST")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(mnist_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a `.keras` file; trained once per test session, whichever module asks first."""
    if "tiny" not in _cache:
        _cache["tiny"] = train_tiny_model(mnist_file, tmp_path_factory.mktemp("tiny_model"))
    return _cache["tiny"]


def seven(size: tuple[int, int] = (200, 200), box: tuple[int, int, int, int] | None = None,
          ink: int | tuple = 0, paper: int | tuple = 255, mode: str = "L") -> Image.Image:
    """A hand-ish '7' (bar and slanted stem) drawn in `box` (default: the middle of the picture)."""
    width, height = size
    left, top, right, bottom = box or (width * 0.3, height * 0.2, width * 0.7, height * 0.8)
    pen = max(1, round((bottom - top) * 0.12))
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    draw.line([(left, top), (right, top), (left + (right - left) * 0.35, bottom)], fill=ink, width=pen, joint="curve")
    return image


def vertical_one(size: int = 120) -> Image.Image:
    """A black '1' (a vertical bar) on white."""
    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).line([(size / 2, size * 0.15), (size / 2, size * 0.85)], fill=0, width=max(2, size // 12))
    return image


def mnist_digit(mnist: Path, index: int = 0) -> tuple[np.ndarray, int]:
    with np.load(mnist) as data:
        return data["x_test"][index], int(data["y_test"][index])


def one_digit_per_class(mnist: Path) -> list[tuple[Image.Image, int]]:
    """The first MNIST test digit of each class, as a user's picture: dark ink on white paper,
    enlarged to 140x140."""
    with np.load(mnist) as data:
        x, y = data["x_test"], data["y_test"]
    pictures = []
    for label in range(10):
        index = int(np.flatnonzero(y == label)[0])
        pictures.append((Image.fromarray(255 - x[index]).resize((140, 140), Image.Resampling.BILINEAR), label))
    return pictures

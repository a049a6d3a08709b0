"""Shared fixtures of the serving tests: a tiny trained model and digit pictures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO / "data" / "raw" / "mnist.npz"
TRAIN_IMAGES = 3000

_cache: dict[str, Path] = {}


def train_tiny_model(mnist: Path, out: Path) -> Path:
    """The reference preset trained one epoch on 3000 MNIST images (about 90% test accuracy)."""
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
    model = compile_model(build_model(recipe, seed=0), recipe, steps, epochs=1, jit_compile=False)
    model.fit(x, y, batch_size=recipe.batch_size, epochs=1, verbose=0)
    path = out / "tiny.keras"
    model.save(path)
    return path


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

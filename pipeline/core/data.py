"""The data contract shared by the stages and the servers: the picture shape, split files, their
checks, and seeded subsets.

A split file is an `.npz` with `x` uint8 (N, 28, 28) raw 0-255 pixels and `y` uint8 labels 0-9.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

IMAGE_SIDE = 28  # MNIST pictures are IMAGE_SIDE x IMAGE_SIDE grey pixels
INPUT_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, 1)  # one picture as every model takes it
NUM_CLASSES = 10

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")  # the raw file, Keras' layout
MAX_CLASS_SHARE = 0.15  # MNIST's classes hold 9-11% each; far outside means a broken file
MIN_CLASS_SHARE = 0.05

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def as_model_input(pixels) -> np.ndarray:
    """Pixels (N, 28, 28) or (N, 28, 28, 1), any numeric type or nested lists, as the contiguous float32
    (N, 28, 28, 1) raw 0-255 tensor every model takes."""
    return np.ascontiguousarray(np.asarray(pixels, dtype=np.float32).reshape(-1, *INPUT_SHAPE))


def read_npz(path: Path) -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz ({type(error).__name__}: {error})") from None


def check_images(x: np.ndarray, y: np.ndarray, name: str) -> None:
    """Shape, dtype, label range and class balance; raises ValueError naming what is wrong."""
    if x.ndim != 3 or x.shape[1:] != INPUT_SHAPE[:2]:
        raise ValueError(f"{name} images have shape {x.shape}, expected (N, {IMAGE_SIDE}, {IMAGE_SIDE})")
    if x.dtype != np.uint8:
        raise ValueError(f"{name} images are {x.dtype}, expected uint8 pixels 0-255")
    if y.shape != (len(x),):
        raise ValueError(f"{name} has {len(x)} images but labels of shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"{name} labels span {y.min()}..{y.max()}, expected 0..{NUM_CLASSES - 1}")
    shares = np.bincount(y.astype(np.int64), minlength=NUM_CLASSES) / max(len(y), 1)
    if len(y) >= 1000 and (shares.min() < MIN_CLASS_SHARE or shares.max() > MAX_CLASS_SHARE):
        raise ValueError(
            f"{name} class balance is off: shares {np.round(shares, 3).tolist()} "
            f"(each class should hold {MIN_CLASS_SHARE:.0%}-{MAX_CLASS_SHARE:.0%})"
        )


def stratified_take(split: Split, size: int, seed: int) -> Split:
    """A seeded, class-stratified subset of `size` items (the whole split when size is 0 or too big)."""
    from sklearn.model_selection import train_test_split

    if size <= 0 or size >= len(split):
        return split
    index = np.arange(len(split))
    kept, _ = train_test_split(index, train_size=size, stratify=split.y, random_state=seed)
    kept = np.sort(kept)
    return Split(split.x[kept], split.y[kept])


def save_split(split: Split, path: Path) -> None:
    """The same bytes for the same split (np.savez stamps the time), so an unchanged split re-runs nothing."""
    from pipeline.core.hashing import write_stable_npz

    with Path(path).open("wb") as stream:
        write_stable_npz({"x": split.x, "y": split.y}, stream)


def load_split(path: str | Path) -> Split:
    """Read one split file, with a clear error if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro preprocess` first")
    try:
        arrays = read_npz(path)
        split = Split(arrays["x"], arrays["y"])
        check_images(split.x, split.y, str(path))
    except (ValueError, KeyError) as error:
        raise PipelineError(f"{path} is damaged ({error}); re-create it with `dvc repro -f preprocess`") from None
    return split


def split_digest(split: Split) -> str:
    """Identifies a split's content (e.g. the test set a champion was scored on)."""
    digest = hashlib.sha256(split.x.tobytes())
    digest.update(split.y.tobytes())
    return digest.hexdigest()[:16]

"""Stage 2: check the raw data and split off a seeded, stratified validation set.

Writes `train.npz`, `val.npz` and `test.npz` (arrays `x` uint8 (N, 28, 28), `y` uint8) under
`preprocess.output_dir`. Pixels stay raw 0-255: scaling lives inside the model.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.config import PreprocessParams, load_params
from pipeline.errors import PipelineError, exit_on_user_error
from pipeline.fetch import ARRAY_KEYS, read_npz
from pipeline.runtime import setup_logging

log = logging.getLogger("pipeline.preprocess")

SPLITS = ("train", "val", "test")
MAX_CLASS_SHARE = 0.15  # MNIST's classes hold 9-11% each; far outside means a broken file
MIN_CLASS_SHARE = 0.05


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def check_images(x: np.ndarray, y: np.ndarray, name: str) -> None:
    """Shape, dtype, label range and class balance; raises ValueError naming what is wrong."""
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"{name} images have shape {x.shape}, expected (N, 28, 28)")
    if x.dtype != np.uint8:
        raise ValueError(f"{name} images are {x.dtype}, expected uint8 pixels 0-255")
    if y.shape != (len(x),):
        raise ValueError(f"{name} has {len(x)} images but labels of shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{name} labels span {y.min()}..{y.max()}, expected 0..9")
    shares = np.bincount(y.astype(np.int64), minlength=10) / max(len(y), 1)
    if len(y) >= 1000 and (shares.min() < MIN_CLASS_SHARE or shares.max() > MAX_CLASS_SHARE):
        raise ValueError(
            f"{name} class balance is off: shares {np.round(shares, 3).tolist()} "
            f"(each class should hold {MIN_CLASS_SHARE:.0%}-{MAX_CLASS_SHARE:.0%})"
        )


def image_digests(x: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in x}


def count_shared_images(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of `b` also appear, byte for byte, in `a`."""
    seen = image_digests(a)
    return sum(hashlib.blake2b(image.tobytes(), digest_size=16).digest() in seen for image in b)


def stratified_take(split: Split, size: int, seed: int) -> Split:
    """A seeded, class-stratified subset of `size` items (the whole split when size is 0 or too big)."""
    if size <= 0 or size >= len(split):
        return split
    index = np.arange(len(split))
    kept, _ = train_test_split(index, train_size=size, stratify=split.y, random_state=seed)
    kept = np.sort(kept)
    return Split(split.x[kept], split.y[kept])


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    if val_size >= len(train):
        raise ValueError(f"preprocess.val_size={val_size} leaves no training images (have {len(train)})")
    index = np.arange(len(train))
    train_index, val_index = train_test_split(index, test_size=val_size, stratify=train.y, random_state=seed)
    train_index, val_index = np.sort(train_index), np.sort(val_index)
    return Split(train.x[train_index], train.y[train_index]), Split(train.x[val_index], train.y[val_index])


def prepare_splits(raw: dict[str, np.ndarray], params: PreprocessParams, seed: int) -> dict[str, Split]:
    """Check the raw arrays and return train/val/test splits; ValueError names any failed check."""
    missing = [key for key in ARRAY_KEYS if key not in raw]
    if missing:
        raise ValueError(f"raw data lacks arrays {missing}")
    full_train, test = Split(raw["x_train"], raw["y_train"]), Split(raw["x_test"], raw["y_test"])
    check_images(full_train.x, full_train.y, "training split")
    check_images(test.x, test.y, "test split")
    shared = count_shared_images(full_train.x, test.x)
    if shared:
        raise ValueError(f"{shared} test images also appear in the training split; test scores would be inflated")
    train, val = split_validation(full_train, params.val_size, seed)
    return {
        "train": stratified_take(train, params.train_limit, seed),
        "val": val,
        "test": stratified_take(test, params.test_limit, seed),
    }


def write_splits(splits: dict[str, Split], output_dir: Path) -> None:
    """Write all splits into a fresh folder, then swap it in: never a half-written set."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        for name, split in splits.items():
            np.savez(staging / f"{name}.npz", x=split.x, y=split.y)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.chmod(0o755)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_split(path: Path) -> Split:
    """Read one split file written by this stage, with a clear error if it is missing or damaged."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro preprocess` first")
    try:
        arrays = read_npz(path)
        split = Split(arrays["x"], arrays["y"])
        check_images(split.x, split.y, str(path))
    except (ValueError, KeyError) as error:
        raise PipelineError(f"{path} is damaged ({error}); re-create it with `dvc repro -f preprocess`") from None
    return split


def load_splits(output_dir: str | Path, names: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    return {name: load_split(Path(output_dir) / f"{name}.npz") for name in names}


@exit_on_user_error
def main() -> None:
    setup_logging()
    params = load_params()
    raw_path = Path(params.fetch.output)
    if not raw_path.is_file():
        raise PipelineError(f"{raw_path} is missing; run `dvc repro fetch` first")
    try:
        splits = prepare_splits(read_npz(raw_path), params.preprocess, params.seed)
    except ValueError as error:
        raise PipelineError(f"data check failed: {error}; re-fetch with `dvc repro -f fetch`") from None
    write_splits(splits, Path(params.preprocess.output_dir))
    log.info("wrote %s", ", ".join(f"{name} {len(split)}" for name, split in splits.items()))


if __name__ == "__main__":
    main()

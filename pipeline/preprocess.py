"""Stage 2: check the raw data, split off a seeded, stratified validation set, and add users' feedback.

Writes the train, val and test split files that `paths` names (see `pipeline.core.data` for the
format), and users' labelled pictures (`paths.feedback`) split into a part to train on, whose digits
join the training split, and a holdout part (`paths.feedback_split`). Pixels stay raw 0-255: scaling
lives inside the model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.core.config import PreprocessParams, load_stage_params
from pipeline.core.data import (
    ARRAY_KEYS,
    Split,
    check_images,
    read_npz,
    save_split,
    stratified_take,
)
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.paths import staged_outputs
from pipeline.core.runtime import setup_logging
from pipeline.monitoring import feedback
from pipeline.monitoring.feedback import FeedbackSet

log = logging.getLogger("pipeline.preprocess")

PARAMS = ("seed", "preprocess")  # the params sections this stage reads (its dvc.yaml entry lists the same)


def image_digests(x: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in x}


def count_shared_images(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of `b` also appear, byte for byte, in `a`."""
    seen = image_digests(a)
    return sum(hashlib.blake2b(image.tobytes(), digest_size=16).digest() in seen for image in b)


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    if val_size >= len(train):  # a param that does not fit the data: the fix is in params.yaml, not the data
        raise PipelineError(f"preprocess.val_size={val_size} leaves no training images (the raw training split has "
                            f"{len(train)}); set preprocess.val_size below {len(train)} in params.yaml")
    index = np.arange(len(train))
    train_index, val_index = train_test_split(index, test_size=val_size, stratify=train.y, random_state=seed)
    train_index, val_index = np.sort(train_index), np.sort(val_index)
    return Split(train.x[train_index], train.y[train_index]), Split(train.x[val_index], train.y[val_index])


def with_feedback(splits: dict[str, Split], users: FeedbackSet, holdout_share: float) -> tuple[dict[str, Split], tuple]:
    """Users' labelled pictures split into a training part, whose digits join the training split, and a
    holdout part; pictures identical to a test image are left out (the test split never changes and
    must stay unseen). Returns the splits and (training part, holdout part)."""
    leaked = np.isin(np.array([hashlib.blake2b(x.tobytes(), digest_size=16).digest() for x in users.x], dtype=object),
                     np.array(list(image_digests(splits["test"].x)), dtype=object)) if len(users) else np.zeros(0, bool)
    if leaked.any():
        log.warning("left out %d feedback pictures identical to test images", int(leaked.sum()))
    train_part, holdout_part = feedback.split(users.take(~leaked), holdout_share)
    digits = train_part.digits
    train = splits["train"]
    joined = Split(np.concatenate([train.x, digits.x]), np.concatenate([train.y, digits.y.astype(train.y.dtype)]))
    return {**splits, "train": joined}, (train_part, holdout_part)


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


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    params = load_stage_params("preprocess", PARAMS)
    paths = params.paths
    raw_path = Path(paths.raw)
    if not raw_path.is_file():
        raise PipelineError(f"{raw_path} is missing; run `dvc repro fetch` first")
    try:
        splits = prepare_splits(read_npz(raw_path), params.preprocess, params.seed)
    except ValueError as error:
        raise PipelineError(f"data check failed: {error}; re-fetch with `dvc repro -f fetch`") from None
    splits, (users_train, users_holdout) = with_feedback(splits, feedback.load(paths.feedback),
                                                         params.preprocess.feedback_holdout)
    targets = {"train": paths.train_split, "val": paths.val_split, "test": paths.test_split}
    with staged_outputs() as staging:
        for name, split in splits.items():
            save_split(split, staging.path(targets[name]))
        feedback.save_parts(users_train, users_holdout, staging.path(paths.feedback_split))
    log.info("wrote %s; users' feedback: %d to train on (%d digits), %d held out", ", ".join(
        f"{name} {len(split)}" for name, split in splits.items()), len(users_train), len(users_train.digits),
        len(users_holdout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""User feedback as versioned training data.

`python -m pipeline feedback export` writes every logged picture that a user labelled to
`<paths.feedback>/feedback.npz` (DVC-tracked: the export runs `dvc add`, so the folder holds a
`.dvc` file to commit). `preprocess` splits it, by a hash of each prediction id so a picture never
changes sides as more feedback comes in, into a training part (its digits join the training split,
its "not a digit" pictures the digit verdict's negatives) and a holdout part that `evaluate` scores
and the promotion rule compares. The test split never changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.data import IMAGE_SIDE
from pipeline.core.errors import PipelineError
from pipeline.core.hashing import write_stable_npz
from pipeline.monitoring.drift import NOT_A_DIGIT, answered_right

FEEDBACK_FILE = "feedback.npz"  # inside the folder `paths.feedback` names (the folder is preprocess's dependency)


@dataclass(frozen=True)
class FeedbackSet:
    """Labelled pictures: uint8 (n, 28, 28), labels 0-9 or NOT_A_DIGIT, and the prediction ids they came from."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, keep: np.ndarray) -> FeedbackSet:
        return FeedbackSet(self.x[keep], self.y[keep], self.ids[keep])

    @property
    def digits(self) -> FeedbackSet:
        return self.take(self.y != NOT_A_DIGIT)

    @property
    def nondigits(self) -> FeedbackSet:
        return self.take(self.y == NOT_A_DIGIT)


def empty() -> FeedbackSet:
    return FeedbackSet(np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8), np.zeros(0, np.int64), np.zeros(0, "<U48"))


def from_rows(rows) -> tuple[FeedbackSet, int]:
    """The labelled rows of the log (`read_rows`) in id order, and how many lacked their pixels."""
    labelled = rows[rows["feedback"] >= 0]
    with_pixels = labelled[labelled["pixels"].notna()].sort_values("id")
    if with_pixels.empty:
        return empty(), len(labelled)
    x = np.stack([np.frombuffer(data, np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE) for data in with_pixels["pixels"]])
    return (FeedbackSet(x, with_pixels["feedback"].to_numpy(np.int64), with_pixels["id"].to_numpy("<U48")),
            len(labelled) - len(with_pixels))


def save(feedback: FeedbackSet, path: Path) -> None:
    """The same bytes for the same labelled pictures, so an unchanged export re-runs nothing."""
    with path.open("wb") as stream:
        write_stable_npz({"x": feedback.x, "y": feedback.y, "ids": feedback.ids}, stream)


def load(folder: str | Path) -> FeedbackSet:
    """The exported feedback in `folder` (none yet: an empty set)."""
    folder = Path(folder)
    path = folder / FEEDBACK_FILE
    if not path.is_file():
        if (folder / f"{FEEDBACK_FILE}.dvc").is_file():
            raise PipelineError(f"{path} is missing but {path}.dvc tracks it; run `dvc pull {path}` (or `dvc checkout`)")
        return empty()
    try:
        with np.load(path, allow_pickle=False) as data:
            feedback = FeedbackSet(data["x"], data["y"].astype(np.int64), data["ids"])
    except (OSError, ValueError, KeyError) as error:
        raise PipelineError(f"{path} is damaged ({error}); export it again with `python -m pipeline feedback export`") from None
    if feedback.x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or feedback.x.dtype != np.uint8 or len(feedback.x) != len(feedback.y):
        raise PipelineError(f"{path} does not hold uint8 28x28 pictures with one label each; export it again")
    if len(feedback) and (feedback.y.min() < 0 or feedback.y.max() > NOT_A_DIGIT):
        raise PipelineError(f"{path} holds labels outside 0-9 and {NOT_A_DIGIT} (not a digit); export it again")
    return feedback


def in_holdout(ids: np.ndarray, share: float) -> np.ndarray:
    """Which pictures belong to the holdout: a fixed hash of the prediction id, so a picture keeps its side."""
    def position(prediction_id: str) -> float:
        return int.from_bytes(hashlib.blake2b(prediction_id.encode(), digest_size=8).digest(), "big") / 2**64

    return np.array([position(str(prediction_id)) < share for prediction_id in ids], dtype=bool)


def split(feedback: FeedbackSet, holdout_share: float) -> tuple[FeedbackSet, FeedbackSet]:
    """(training part, holdout part)."""
    holdout = in_holdout(feedback.ids, holdout_share)
    return feedback.take(~holdout), feedback.take(holdout)


def save_parts(train: FeedbackSet, holdout: FeedbackSet, path: Path) -> None:
    """preprocess's output: both parts in one file (`paths.feedback_split`)."""
    with path.open("wb") as stream:
        write_stable_npz({"train_x": train.x, "train_y": train.y, "train_ids": train.ids, "holdout_x": holdout.x,
                          "holdout_y": holdout.y, "holdout_ids": holdout.ids}, stream)


def load_parts(path: str | Path) -> tuple[FeedbackSet, FeedbackSet]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `dvc repro preprocess` first")
    with np.load(path, allow_pickle=False) as data:
        return tuple(FeedbackSet(data[f"{part}_x"], data[f"{part}_y"].astype(np.int64), data[f"{part}_ids"])
                     for part in ("train", "holdout"))


def holdout_accuracy(labels: np.ndarray, predicted: np.ndarray, is_digit: np.ndarray | None) -> float:
    """The share answered right (`drift.answered_right`); NaN for an empty holdout."""
    return float(np.mean(answered_right(labels, predicted, is_digit))) if len(labels) else float("nan")

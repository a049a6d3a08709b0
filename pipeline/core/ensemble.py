"""Ensembles as one model: the members' probabilities averaged inside a plain Keras functional model.

The ensemble is saved, logged, registered, exported and served exactly like a single model: it takes
the same `pixels` input and returns the same float32 `probabilities`, and it is made only of Keras'
own layers (each member is a nested functional model without its augmentation layer, joined by
`keras.layers.Average`), so it loads with `keras.saving.load_model(..., safe_mode=True)` and needs no
custom classes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
from keras import layers

from pipeline.core.config import Recipe
from pipeline.core.errors import PipelineError, first_line
from pipeline.core.export import float32_clone
from pipeline.core.data import INPUT_SHAPE
from pipeline.core.training import fit

ENSEMBLE_NAME = "mnist_ensemble"
OUTPUT_NAME = "probabilities"  # the single model's output layer has the same name


def member_name(index: int) -> str:
    """The sub-model name of the `index`-th member (1-based), also its MLflow metric prefix."""
    return f"member{index}"


def member_seeds(seed: int, members: int) -> list[int]:
    """Member i (1-based) trains with `seed + i - 1`: member 1 is the single model `seed` gives."""
    return [seed + offset for offset in range(members)]


def average_members(members: Sequence[keras.Model]) -> keras.Model:
    """One functional model whose output is the mean of the members' probabilities.

    The members must be inference models (`core.model.inference_model`) with the shared input
    contract; they are renamed in place to `member1`, `member2`, ... (sub-model names must be
    unique) and keep their weights. The result computes in float32 at its output whatever the
    members' dtype policy.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    if len({id(member) for member in members}) != len(members):
        raise ValueError("each member must be a distinct model")
    pixels = keras.Input(INPUT_SHAPE, name="pixels", dtype="float32")
    outputs = []
    for index, member in enumerate(members, start=1):
        member.name = member_name(index)
        outputs.append(member(pixels))
    averaged = layers.Average(dtype="float32", name=OUTPUT_NAME)(outputs)
    return keras.Model(pixels, averaged, name=ENSEMBLE_NAME)


class MemberFailed(PipelineError):
    """One member of an ensemble could not be trained; the ensemble is not made."""


def fit_members(recipe: Recipe, members: int, epochs: int, patience: int, x_train, y_train, x_val, y_val, seed: int,
                on_epoch=None):
    """Train `members` models of one recipe with seeds `seed`, `seed + 1`, ... (`member_seeds`),
    each with `fit`; returns (their inference models, their histories), in member order.

    Member 1 trains exactly as a single model does; every later member re-seeds Python, NumPy and TF
    with its own seed first. `on_epoch(member, row)` gets each member's epochs (member: 1-based).
    With several members, a member that fails raises `MemberFailed` naming it, so the caller saves
    nothing: a partial ensemble is never made.
    """
    models, histories = [], []
    for index, member_seed in enumerate(member_seeds(seed, members), start=1):
        if index > 1:
            keras.utils.set_random_seed(member_seed)
        callback = functools.partial(on_epoch, index) if on_epoch else None
        try:
            model, history = fit(recipe, epochs, patience, x_train, y_train, x_val, y_val, member_seed, on_epoch=callback)
        except Exception as error:
            if members == 1:
                raise  # a single model fails as it always has
            raise MemberFailed(f"member {index} of {members} (seed {member_seed}) failed: {type(error).__name__}: "
                               f"{first_line(error)}; no ensemble was saved") from error
        models.append(model)
        histories.append(history)
    return models, histories


def served_model(models: Sequence[keras.Model]) -> keras.Model:
    """The model to save: the one member, or the members averaged; in float32 (bf16 speeds training
    only: the model is scored, registered and served in float32)."""
    return float32_clone(models[0] if len(models) == 1 else average_members(models))


def ensemble_summary(model: keras.Model, histories: list[list[dict]], x_val, y_val) -> dict:
    """What the ensemble scores on validation, next to each member's best epoch and epoch count."""
    predicted = model.predict(x_val, batch_size=1000, verbose=0).argmax(axis=1)
    return {"members": len(histories), "ensemble_val_accuracy": float((predicted == y_val).mean()),
            "member_val_accuracies": [max(row["val_accuracy"] for row in rows) for rows in histories],
            "member_epochs_run": [len(rows) for rows in histories]}

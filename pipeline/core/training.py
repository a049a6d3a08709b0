"""How a recipe trains: optimiser, schedule, weight average, and the one fit loop that `train`,
every tuning trial and the benchmark share (their own per-epoch work goes in as callbacks)."""

from __future__ import annotations

import math

import keras

from pipeline.core.config import Recipe
from pipeline.core.model import build_model, inference_model

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


def learning_rate(recipe: Recipe, total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Constant, or one-cycle (linear warm-up over `recipe.warmup` of the steps, then cosine to 0)."""
    if recipe.schedule == "constant":
        return recipe.learning_rate
    warmup = max(int(total_steps * recipe.warmup), 1)
    return keras.optimizers.schedules.CosineDecay(
        recipe.learning_rate / 25.0,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=recipe.learning_rate,
        warmup_steps=warmup,
    )


def ema_momentum(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step momentum of a weight average spanning about `ema_epochs` epochs."""
    return max(0.0, 1.0 - 1.0 / max(ema_epochs * steps_per_epoch, 1.0))


def make_optimizer(recipe: Recipe, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    rate = learning_rate(recipe, steps_per_epoch * epochs)
    average = {"use_ema": recipe.ema_epochs > 0, "ema_momentum": ema_momentum(recipe.ema_epochs, steps_per_epoch)}
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=recipe.weight_decay, **average)
    return keras.optimizers.Adam(rate, **average)


def weight_average_callbacks(recipe: Recipe) -> list[keras.callbacks.Callback]:
    """With `recipe.ema_epochs`, swap the averaged weights in at every epoch end, so validation, early
    stopping, pruning and per-epoch scoring all see the weights that get saved. Goes first in the
    callback list, so the callbacks after it see the averaged weights."""
    return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if recipe.ema_epochs > 0 else []


def steps_per_epoch(images: int, batch_size: int) -> int:
    return max(math.ceil(images / batch_size), 1)


def compile_model(model: keras.Model, recipe: Recipe, steps_per_epoch: int, epochs: int,
                  jit_compile: bool | str = "auto") -> keras.Model:
    model.compile(
        optimizer=make_optimizer(recipe, steps_per_epoch, epochs),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def prepare_training(recipe: Recipe, seed: int, train_images: int, epochs: int,
                     jit_compile: bool | str = "auto") -> tuple[keras.Model, list[keras.callbacks.Callback]]:
    """The model built and compiled for `epochs` over `train_images`, and the callbacks that must lead
    `fit`'s callback list (the weight-average swap, so the callbacks after it see the averaged weights)."""
    model = build_model(recipe, seed=seed)
    compile_model(model, recipe, steps_per_epoch(train_images, recipe.batch_size), epochs, jit_compile)
    return model, weight_average_callbacks(recipe)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step, schedule included."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def epoch_recorder(history: list[dict[str, float]], on_epoch=None) -> keras.callbacks.Callback:
    """A Keras callback appending {epoch, loss, accuracy, val_*, learning_rate} per epoch."""

    class EpochRecorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            row["learning_rate"] = current_learning_rate(self.model.optimizer)
            history.append(row)
            if on_epoch:
                on_epoch(row)

    return EpochRecorder()


def fit(recipe: Recipe, epochs: int, patience: int | None, x_train, y_train, x_val=None, y_val=None,
        seed: int = 0, on_epoch=None, *, callbacks=(), verbose: int = 2):
    """Build, compile and fit; returns (the model to save, per-epoch history rows).

    Callback order: the weight-average swap, the history recorder (calling `on_epoch(row)`), the
    caller's `callbacks` (pruning, metric checks, timing), then, with `patience`, early stopping on
    val_accuracy (best weights restored). Without `x_val`, no validation runs.
    """
    model, leading_callbacks = prepare_training(recipe, seed, len(x_train), epochs)
    history: list[dict[str, float]] = []
    stopping = [] if patience is None else [keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=patience, restore_best_weights=True, verbose=1)]
    model.fit(x_train, y_train, validation_data=None if x_val is None else (x_val, y_val), epochs=epochs,
              batch_size=recipe.batch_size, shuffle=True, verbose=verbose,
              callbacks=[*leading_callbacks, epoch_recorder(history, on_epoch), *callbacks, *stopping])
    return inference_model(model, recipe), history

"""The CNN family: one builder shared by presets, tuning trials and final training.

Every model takes raw 0-255 pixels, float32 of shape (N, 28, 28, 1): scaling lives in a
Rescaling layer, so saved and served models need no preprocessing outside them.
"""

from __future__ import annotations

import keras
from keras import layers

from pipeline.config import Recipe

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def augmentation(strength: float, seed: int) -> keras.Sequential:
    """Small shifts, rotations and zooms; active only while training."""
    return keras.Sequential(
        [
            layers.RandomRotation(strength * 0.25, fill_mode="constant", seed=seed),  # 0.1 -> +-9 degrees
            layers.RandomTranslation(strength, strength, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(strength, fill_mode="constant", seed=seed + 2),
        ],
        name="augment",
    )


def build_model(recipe: Recipe, seed: int = 0) -> keras.Model:
    """Conv blocks (each `convs_per_block` convs then 2x2 max-pool), optional dense, softmax."""
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    if recipe.augment > 0:
        x = augmentation(recipe.augment, seed)(x)
    for block, filters in enumerate(recipe.conv_filters):
        for conv in range(recipe.convs_per_block):
            name = f"block{block + 1}_conv{conv + 1}"
            x = layers.Conv2D(
                filters, recipe.kernel_size, padding=recipe.padding,
                use_bias=not recipe.batch_norm, activation=None if recipe.batch_norm else "relu", name=name,
            )(x)
            if recipe.batch_norm:
                x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
                x = layers.Activation("relu", name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    if recipe.dense_units:
        if recipe.dropout:
            x = layers.Dropout(recipe.dropout, seed=seed, name="dropout_features")(x)
        x = layers.Dense(recipe.dense_units, activation="relu", name="dense")(x)
    if recipe.dropout:
        x = layers.Dropout(recipe.dropout, seed=seed + 3, name="dropout_head")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def learning_rate(recipe: Recipe, total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Constant, cosine decay, or one-cycle (linear warm-up over 25% of steps, then cosine to 0)."""
    if recipe.schedule == "constant":
        return recipe.learning_rate
    if recipe.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(recipe.learning_rate, decay_steps=max(total_steps, 1))
    warmup = max(total_steps // 4, 1)
    return keras.optimizers.schedules.CosineDecay(
        recipe.learning_rate / 25.0,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=recipe.learning_rate,
        warmup_steps=warmup,
    )


def make_optimizer(recipe: Recipe, total_steps: int) -> keras.optimizers.Optimizer:
    rate = learning_rate(recipe, total_steps)
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=recipe.weight_decay or 1e-4)
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True)
    return keras.optimizers.Adam(rate)


def compile_model(model: keras.Model, recipe: Recipe, total_steps: int, jit_compile: bool | str = "auto") -> keras.Model:
    model.compile(
        optimizer=make_optimizer(recipe, total_steps),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step, schedule included."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))

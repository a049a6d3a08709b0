"""The CNN family: one builder shared by presets, tuning trials and final training.

Every model takes raw 0-255 pixels, float32 of shape (N, 28, 28, 1): scaling lives in a
Rescaling layer, so saved and served models need no preprocessing outside them.
"""

from __future__ import annotations

import math

import keras
from keras import layers

from pipeline.config import Recipe

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@keras.saving.register_keras_serializable(package="pipeline")
class RandomAffine(layers.Layer):
    """Random rotation, zoom and shift of each image, composed into one affine warp.

    Keras' RandomRotation, RandomZoom and RandomTranslation each warp the batch: three
    resamplings where one does (measured: 5-9 s of a 55k-image epoch on 2 cores, vs 1.5-1.8 s).
    Active only while training; `inference_model` drops it before a model is saved.
    """

    def __init__(self, strength: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength = strength
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        count = ops.shape(images)[0]

        def uniform(limit):
            return keras.random.uniform((count,), -limit, limit, seed=self.generator)

        angle = uniform(self.strength * 0.5 * math.pi)  # 0.1 -> +-9 degrees
        scale = 1.0 + uniform(self.strength)
        shift_x, shift_y = uniform(self.strength * INPUT_SHAPE[1]), uniform(self.strength * INPUT_SHAPE[0])
        return ops.image.affine_transform(images, warp_matrices(angle, scale, shift_x, shift_y),
                                          interpolation="bilinear", fill_mode="constant")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}


def warp_matrices(angle, scale, shift_x, shift_y):
    """Per-image output-to-input maps [a0 a1 a2 b0 b1 b2 0 0] of a rotation and zoom about the
    image centre followed by a shift, as `keras.ops.image.affine_transform` takes them."""
    ops = keras.ops
    centre_x, centre_y = (INPUT_SHAPE[1] - 1) / 2, (INPUT_SHAPE[0] - 1) / 2
    cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
    zeros = ops.zeros_like(angle)
    return ops.stack([cos, -sin, centre_x - cos * centre_x + sin * centre_y - shift_x,
                      sin, cos, centre_y - sin * centre_x - cos * centre_y - shift_y, zeros, zeros], axis=1)


def space_to_depth(x, patch: int):
    """(28, 28, 1) -> (28/patch, 28/patch, patch*patch): each patch's pixels become channels.

    Built from Reshape and Permute (not a Lambda) so saved models load without custom code."""
    side = INPUT_SHAPE[0] // patch
    x = layers.Reshape((side, patch, side, patch), name="patches_split")(x)
    x = layers.Permute((1, 3, 2, 4), name="patches_gather")(x)
    return layers.Reshape((side, side, patch * patch), name="patches")(x)


def build_model(recipe: Recipe, seed: int = 0) -> keras.Model:
    """Optional space-to-depth stem, conv blocks (each `convs_per_block` convs then 2x2 max-pool),
    optional dense, softmax."""
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    if recipe.augment > 0:
        x = RandomAffine(recipe.augment, seed=seed, dtype="float32", name="augment")(x)
    if recipe.patch_size > 1:
        x = space_to_depth(x, recipe.patch_size)
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


def inference_model(model: keras.Model, recipe: Recipe) -> keras.Model:
    """The trained model without its training-only augmentation layer: the same weights, and a
    saved file that loads with plain Keras (no custom classes) wherever it is served."""
    if recipe.augment == 0:
        return model
    lean = build_model(recipe.with_overrides({"augment": 0.0}))
    for layer in lean.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    return lean


def learning_rate(recipe: Recipe, total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Constant, cosine decay, or one-cycle (linear warm-up over `recipe.warmup` of the steps, then cosine to 0)."""
    if recipe.schedule == "constant":
        return recipe.learning_rate
    if recipe.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(recipe.learning_rate, decay_steps=max(total_steps, 1))
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
        return keras.optimizers.AdamW(rate, weight_decay=recipe.weight_decay or 1e-4, **average)
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, **average)
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

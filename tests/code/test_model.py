import numpy as np
import pytest

from pipeline.core.config import load_params
from pipeline.core.model import build_model
from pipeline.core.training import compile_model, current_learning_rate, learning_rate
from tests.helpers import make_recipe


@pytest.fixture(scope="module")
def presets(repo_root):
    return load_params(repo_root / "params.yaml").presets


def test_reference_preset_is_the_seeds_model(presets):
    model = build_model(presets["reference"])
    assert model.count_params() == 225_034
    kinds = [layer.__class__.__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Rescaling", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
                     "Flatten", "Dense", "Dense"]


@pytest.mark.parametrize("name", ["reference", "fast", "accurate"])
def test_presets_take_raw_pixels_and_return_probabilities(presets, name):
    model = build_model(presets[name])
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype(np.float32)
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_scaling_lives_in_the_model(presets):
    model = build_model(presets["reference"])
    assert model.layers[1].name == "scale"
    assert model.layers[1].scale == pytest.approx(1 / 255)


def test_onecycle_warms_up_then_decays():
    recipe = make_recipe(schedule="onecycle", warmup=0.25, learning_rate=0.01)
    schedule = learning_rate(recipe, total_steps=100)
    rates = [float(schedule(step)) for step in (0, 25, 60, 100)]
    assert rates[0] < rates[1] and rates[1] == pytest.approx(0.01, rel=1e-3) and rates[3] < rates[2] < rates[1]


def test_compiled_model_reports_learning_rate():
    recipe = make_recipe(schedule="constant", learning_rate=0.002)
    model = compile_model(build_model(recipe), recipe, steps_per_epoch=5, epochs=2)
    assert current_learning_rate(model.optimizer) == pytest.approx(0.002)


def test_same_seed_same_initial_weights():
    import keras

    recipe = make_recipe(dropout=0.2, augment=0.1)
    keras.utils.set_random_seed(7)
    first = build_model(recipe, seed=7).get_weights()
    keras.utils.set_random_seed(7)
    second = build_model(recipe, seed=7).get_weights()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_model_saves_and_loads_without_custom_code(tmp_path):
    import keras

    recipe = make_recipe(conv_filters=[8, 16], dense_units=16)
    model = build_model(recipe)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(pixels)), np.asarray(model(pixels)), rtol=1e-6)


def test_ema_momentum_spans_the_asked_epochs():
    from pipeline.core.training import ema_momentum

    assert ema_momentum(1.0, 100) == pytest.approx(0.99)
    assert ema_momentum(0.5, 100) == pytest.approx(0.98)
    assert ema_momentum(0.001, 10) == 0.0  # shorter than a step: no averaging


def test_weight_average_is_what_epoch_end_callbacks_see_and_what_is_kept():
    """Validation, early stopping and scoring see the averaged weights; the model keeps them."""
    import keras

    from pipeline.core.training import prepare_training

    keras.utils.set_random_seed(3)
    recipe = make_recipe(conv_filters=[4], dense_units=8, ema_epochs=1.0, learning_rate=0.01, batch_size=16)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 64)
    model, leading_callbacks = prepare_training(recipe, seed=3, train_images=len(x), epochs=2)
    assert leading_callbacks, "a weight average needs its swap callback"
    seen = []
    spy = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(model.get_weights()))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[*leading_callbacks, spy])
    for kept, at_epoch_end in zip(model.get_weights(), seen[-1]):  # without the swap, fit's end would
        np.testing.assert_array_equal(kept, at_epoch_end)          # replace what was scored


def test_warp_is_identity_without_rotation_zoom_or_shift_and_shifts_whole_pixels():
    import keras

    from pipeline.core.model import warp_matrices

    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 10, 12, 0] = 1.0
    zero, one = np.zeros(1, np.float32), np.ones(1, np.float32)
    same = keras.ops.image.affine_transform(image, warp_matrices(zero, one, zero, zero))
    np.testing.assert_allclose(np.asarray(same), image, atol=1e-6)
    moved = np.asarray(keras.ops.image.affine_transform(image, warp_matrices(zero, one, 3 * one, -2 * one)))
    assert moved[0, 8, 15, 0] == pytest.approx(1.0)  # 3 px right, 2 px up


def test_augmentation_changes_training_images_only():
    from pipeline.core.model import RandomAffine

    layer = RandomAffine(0.15, seed=1)
    images = np.random.default_rng(2).random((4, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    assert not np.allclose(np.asarray(layer(images, training=True)), images)


def test_inference_model_drops_augmentation_and_keeps_the_weights(tmp_path):
    import keras

    from pipeline.core.model import inference_model

    recipe = make_recipe(conv_filters=[8, 16], dense_units=16, augment=0.1, dropout=0.2)
    trained = build_model(recipe, seed=4)
    lean = inference_model(trained, recipe)
    assert "augment" not in [layer.name for layer in lean.layers]
    lean.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert not any(type(layer).__module__.startswith("pipeline") for layer in loaded.layers)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(pixels)), np.asarray(trained(pixels, training=False)), rtol=1e-6)

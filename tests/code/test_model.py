import numpy as np
import pytest

from pipeline.config import Recipe, load_params
from pipeline.model import build_model, compile_model, current_learning_rate, learning_rate


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
    recipe = Recipe(schedule="onecycle", learning_rate=0.01)
    schedule = learning_rate(recipe, total_steps=100)
    rates = [float(schedule(step)) for step in (0, 25, 60, 100)]
    assert rates[0] < rates[1] and rates[1] == pytest.approx(0.01, rel=1e-3) and rates[3] < rates[2] < rates[1]


def test_compiled_model_reports_learning_rate():
    recipe = Recipe(schedule="constant", learning_rate=0.002)
    model = compile_model(build_model(recipe), recipe, total_steps=10)
    assert current_learning_rate(model.optimizer) == pytest.approx(0.002)


def test_same_seed_same_initial_weights():
    import keras

    recipe = Recipe(dropout=0.2, augment=0.1)
    keras.utils.set_random_seed(7)
    first = build_model(recipe, seed=7).get_weights()
    keras.utils.set_random_seed(7)
    second = build_model(recipe, seed=7).get_weights()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)

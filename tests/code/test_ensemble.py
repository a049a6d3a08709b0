"""Ensembles as one model: the averaging model, its file, and training its members (tiny data)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from pipeline.core.ensemble import MemberFailed, average_members, fit_members, member_seeds
from pipeline.core.model import build_model, inference_model
from tests.helpers import make_recipe

TINY = dict(conv_filters=[4], dense_units=0)  # a few thousand parameters: quick to build, fit and save


def pixels(count: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28, 1)).astype(np.float32)


def members(count: int, **recipe) -> list:
    """Inference models (as `fit` returns them) with different initial weights."""
    chosen = make_recipe(**{**TINY, **recipe})
    return [inference_model(build_model(chosen, seed=seed), chosen) for seed in range(count)]


def predict(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0))


def test_member_seeds_start_at_the_run_seed():
    assert member_seeds(42, 1) == [42]
    assert member_seeds(42, 3) == [42, 43, 44]


def test_ensemble_output_is_the_mean_of_the_members_probabilities():
    parts = members(3)
    x = pixels()
    expected = np.mean([predict(member, x) for member in parts], axis=0)
    ensemble = average_members(parts)
    np.testing.assert_allclose(predict(ensemble, x), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(predict(parts[0], x), predict(parts[1], x))  # the members really differ
    assert ensemble.input.name.startswith("pixels") and tuple(ensemble.input.shape) == (None, 28, 28, 1)
    assert ensemble.layers[-1].name == "probabilities" and tuple(ensemble.output.shape) == (None, 10)
    assert [layer.name for layer in ensemble.layers[1:-1]] == ["member1", "member2", "member3"]


def test_ensemble_of_augmented_bf16_members_outputs_float32_probabilities():
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        parts = members(2, augment=0.1)  # inference_model drops the training-only augmentation layer
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ensemble = average_members(parts)
    out = predict(ensemble, pixels())
    assert out.dtype == np.float32 and ensemble.output.dtype == "float32"
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-2)
    assert all("augment" not in [layer.name for layer in part.layers] for part in parts)


def test_ensemble_saves_and_loads_with_plain_keras_in_safe_mode(tmp_path):
    import keras

    ensemble = average_members(members(2))
    path = tmp_path / "model.keras"
    ensemble.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # no custom_objects: Keras' own layers only
    x = pixels(seed=1)
    np.testing.assert_array_equal(predict(loaded, x), predict(ensemble, x))
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    modules = set()

    def collect(node):
        if isinstance(node, dict):
            if "class_name" in node and "module" in node:
                modules.add(node["module"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(config)
    assert modules and all(module.startswith("keras") for module in modules), modules


def test_ensemble_needs_two_distinct_members():
    (single,) = members(1)
    with pytest.raises(ValueError, match="at least two"):
        average_members([single])
    with pytest.raises(ValueError, match="distinct"):
        average_members([single, single])


@pytest.fixture(scope="module")
def tiny_data(mnist_npz):
    with np.load(mnist_npz) as data:
        x, y = data["x_train"][:256], data["y_train"][:256]
    x = x.astype(np.float32).reshape(-1, 28, 28, 1)
    return x[:192], y[:192], x[192:], y[192:]


def test_fit_members_trains_one_model_per_seed_member_one_as_the_single_model(tiny_data):
    import keras

    from pipeline.core.training import fit

    recipe = make_recipe(**TINY, batch_size=64)
    keras.utils.set_random_seed(7)
    single, single_history = fit(recipe, 1, 1, *tiny_data, seed=7)
    keras.utils.set_random_seed(7)
    seen = []
    models, histories = fit_members(recipe, 2, 1, 1, *tiny_data, seed=7, on_epoch=lambda member, row: seen.append(member))
    assert len(models) == len(histories) == 2 and seen == [1, 2]
    for mine, theirs in zip(models[0].get_weights(), single.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert histories[0][0]["val_accuracy"] == pytest.approx(single_history[0]["val_accuracy"])
    assert not np.allclose(models[0].get_weights()[0], models[1].get_weights()[0])  # seed 8 starts elsewhere


def test_a_failing_member_stops_the_ensemble_with_one_line_naming_it(tiny_data, monkeypatch):
    """The second member gets labels outside 0-9: TensorFlow's loss raises inside the real fit."""
    import pipeline.core.ensemble as ensemble

    real_fit, calls = ensemble.fit, []

    def second_member_with_bad_labels(recipe, epochs, patience, x_train, y_train, *rest, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            y_train = np.full_like(y_train, 10)
        return real_fit(recipe, epochs, patience, x_train, y_train, *rest, **kwargs)

    monkeypatch.setattr(ensemble, "fit", second_member_with_bad_labels)
    with pytest.raises(MemberFailed) as caught:
        fit_members(make_recipe(**TINY, batch_size=64), 3, 1, 1, *tiny_data, seed=7)
    message = str(caught.value)
    assert message.startswith("member 2 of 3 (seed 8) failed: ") and "no ensemble was saved" in message
    assert "\n" not in message and len(calls) == 2  # the third member never started

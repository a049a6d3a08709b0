"""The ONNX copy every server runs: the probabilities, and the features the digit verdict reads."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.ensemble import average_members
from pipeline.core.export import classifier_head, export_onnx
from pipeline.core.model import build_model
from tests.helpers import make_recipe


def onnx_outputs(path, pixels):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})


@pytest.mark.parametrize("members", [1, 2])
def test_onnx_copy_outputs_the_probabilities_and_the_features_the_head_reads(tmp_path, members):
    recipe = make_recipe(conv_filters=[4], dense_units=16)
    models = [build_model(recipe, seed=seed) for seed in range(members)]
    model = models[0] if members == 1 else average_members(models)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1)).astype(np.float32)
    probabilities, features = onnx_outputs(export_onnx(model, tmp_path / "model.onnx"), pixels)
    np.testing.assert_allclose(probabilities, model.predict(pixels, verbose=0), atol=1e-5)
    assert features.shape == (6, 16 + 2 * 4)  # the head's 16 inputs, then block1_pool's 4 channel means and std devs
    weights, bias = classifier_head(model).get_weights()
    logits = features[:, :16] @ weights + bias  # the features are exactly what the (first member's) softmax reads
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    first = models[0].predict(pixels, verbose=0)
    np.testing.assert_allclose(softmax, first, atol=1e-5)

    import keras

    pooled = keras.Model(models[0].inputs, models[0].get_layer("block1_pool").output).predict(pixels, verbose=0)
    np.testing.assert_allclose(features[:, 16:20], pooled.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(features[:, 20:], pooled.std(axis=(1, 2)), atol=1e-4)

"""The /invocations input contract, in-process: the inputs a client commonly gets wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.serving.contract import BadRequest, parse_invocation

SEVEN = np.zeros((28, 28))
SEVEN[6, 8:20] = 255
SEVEN[7:22, 18] = 220


def parse(payload: dict):
    return parse_invocation(json.dumps(payload).encode(), "application/json", 10)


def test_pixels_scaled_to_0_1_are_refused_naming_the_range_and_the_option():
    with pytest.raises(BadRequest, match=r'look scaled to 0-1 \(largest 1\); send raw grey levels from 0 to 255, '
                                         r'or say so with "params": \{"pixel_scale": "0-1"\}'):
        parse({"inputs": [(SEVEN / 255).tolist()]})


def test_a_request_that_says_its_scale_is_0_1_gets_the_same_pixels_as_raw():
    images, _ = parse({"inputs": [(SEVEN / 255).tolist()], "params": {"pixel_scale": "0-1"}})
    np.testing.assert_allclose(images[0, ..., 0], SEVEN, atol=1e-4)
    with pytest.raises(BadRequest, match='out of range.*"pixel_scale": "0-1"'):
        parse({"inputs": [SEVEN.tolist()], "params": {"pixel_scale": "0-1"}})
    with pytest.raises(BadRequest, match='params.pixel_scale must be "0-255"'):
        parse({"inputs": [SEVEN.tolist()], "params": {"pixel_scale": "percent"}})


def test_a_blank_image_is_not_mistaken_for_a_scaled_one():
    images, verdict = parse({"inputs": [np.zeros((28, 28)).tolist()]})
    assert images.shape == (1, 28, 28, 1) and not images.any() and verdict


@pytest.mark.parametrize("literal", [True, False])
def test_a_boolean_among_numbers_is_refused(literal):
    image = SEVEN.tolist()
    image[3][3] = literal
    with pytest.raises(BadRequest, match="pixels must be numbers .*booleans"):
        parse({"inputs": [image]})


def test_the_verdict_option_does_not_count_as_a_boolean_pixel():
    images, verdict = parse({"inputs": [SEVEN.tolist()], "params": {"digit_verdict": False}})
    assert not verdict and images.max() == 255


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 28, 28, 1)])
@pytest.mark.parametrize("kind", [int, float])
def test_the_fast_reading_of_well_formed_images_equals_numpys(shape, kind):
    from pipeline.serving.contract import numpy_pixels, well_formed_pixels

    pixels = np.random.default_rng(0).integers(0, 256, shape).astype(kind) + (0.5 if kind is float else 0)
    value = pixels.tolist()
    fast = well_formed_pixels(value)
    assert fast is not None and fast.dtype == np.float32
    assert np.array_equal(fast, numpy_pixels(value)) and np.array_equal(fast, pixels.reshape(3, 28, 28))


@pytest.mark.parametrize("value", [
    [[["7"] * 28] * 28], [[[["7"]] * 28] * 28], [[[True] * 28] * 28], [[[None] * 28] * 28],
    [[[[1, 2]] * 28] * 28], [[[[1]] * 28] * 28, [[1] * 28] * 28], [[[0] * 28] * 27], [[[1e39] * 28] * 28],
])
def test_anything_but_well_formed_numbers_leaves_the_fast_reading(value):
    from pipeline.serving.contract import well_formed_pixels

    assert well_formed_pixels(value) is None

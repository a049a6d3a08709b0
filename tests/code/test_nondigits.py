"""The generated non-digit set: deterministic, MNIST-shaped, and heldout differs from calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import nondigits


@pytest.mark.parametrize("kind", nondigits.KINDS)
def test_same_arguments_give_the_same_pictures(kind):
    first = nondigits.generate(kind, 12, seed=3, split="calibration")
    assert first.shape == (12, 28, 28) and first.dtype == np.uint8
    assert np.array_equal(first, nondigits.generate(kind, 12, seed=3, split="calibration"))
    assert not np.array_equal(first, nondigits.generate(kind, 12, seed=4, split="calibration"))


@pytest.mark.parametrize("kind", nondigits.KINDS)
def test_heldout_differs_from_calibration(kind):
    calibration = nondigits.generate(kind, 12, seed=0, split="calibration")
    heldout = nondigits.generate(kind, 12, seed=0, split="heldout")
    assert not any(np.array_equal(a, b) for a in calibration for b in heldout)


def test_heldout_shares_no_character_or_shape_family():
    assert not set(nondigits.CHARACTERS["calibration"]) & set(nondigits.CHARACTERS["heldout"])
    for families in (nondigits.DOODLES, nondigits.NOISES, nondigits.CLOTHES):
        assert not set(families["calibration"]) & set(families["heldout"])
    assert not set(nondigits.FONT_FILES["calibration"]) & set(nondigits.FONT_FILES["heldout"])


@pytest.mark.parametrize("kind", ["letters_symbols", "doodles", "clothing"])
def test_drawn_kinds_have_ink_in_an_mnist_box(kind):
    pictures = nondigits.generate(kind, 10, seed=1, split="heldout")
    for picture in pictures:
        rows, cols = np.nonzero(picture)
        assert rows.size > 10
        assert rows.max() - rows.min() < 22 and cols.max() - cols.min() < 22
        assert picture.max() > 40  # clothing may be a dim grey


def test_noise_kind_is_not_empty_and_includes_blank():
    pictures = nondigits.generate("noise_blank", 40, seed=0, split="calibration")
    assert pictures.shape == (40, 28, 28)
    assert (pictures.reshape(40, -1).max(axis=1) == 0).any()  # a blank one
    assert (pictures > 0).mean() > 0.05


def test_only_known_kinds_and_splits():
    with pytest.raises(ValueError):
        nondigits.generate("cats", 1)
    with pytest.raises(ValueError):
        nondigits.generate("doodles", 1, split="test")


def test_core_does_not_import_serving():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(nondigits))
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not any(name.startswith("pipeline.serving") for name in names)


def test_letters_need_only_pillows_own_font(monkeypatch, tmp_path):
    monkeypatch.setattr(nondigits, "FONT_DIRS", (tmp_path,))
    nondigits.font_paths.cache_clear()
    try:
        assert nondigits.font_paths("heldout") == ()
        pictures = nondigits.generate("letters_symbols", 6, seed=0, split="heldout")
        assert pictures.shape == (6, 28, 28) and all(picture.any() for picture in pictures)
    finally:
        nondigits.font_paths.cache_clear()

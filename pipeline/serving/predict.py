"""Predict digits in photos and scans with a trained model (the `predict` command and the web page use it)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.data import IMAGE_SIDE
from pipeline.serving.images import ImageError, prepare_image, read_image
from pipeline.serving.served import Answers, as_served

log = logging.getLogger(__name__)

# --- model ---------------------------------------------------------------------------------


def describe(answers: Answers, index: int) -> dict[str, Any]:
    """The answer for one image: label, its confidence, all ten probabilities, where the model
    has a digit verdict `is_digit` and `digit_score` (null: the picture failed the ink checks), and
    for a registered model `model_version`, the version that answered."""
    probs = answers.probabilities[index]
    label = int(np.argmax(probs))
    return {
        "label": label,
        "confidence": round(float(probs[label]), 6),
        "probabilities": [round(float(p), 6) for p in probs],
        **answers.verdict_fields(index),
        **({} if answers.version is None else {"model_version": answers.version}),
    }


def predict_images(model: Any, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """Answers for pictures already opened; one that shows no digit gets an `error` entry."""
    results: list[dict[str, Any]] = [{} for _ in images]
    ready: list[int] = []
    pixels: list[np.ndarray] = []
    for index, image in enumerate(images):
        try:
            pixels.append(prepare_image(image))
            ready.append(index)
        except ImageError as error:
            results[index] = {"error": str(error)}
    answers = as_served(model).answer(np.stack(pixels) if pixels else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE)))
    for row, index in enumerate(ready):
        results[index] = describe(answers, row)
    return results


def predict_files(model: Any, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One entry per path, in order: {path, label, confidence, probabilities[, is_digit, digit_score]}
    or {path, error}."""
    paths = [str(path) for path in paths]
    images: list[Image.Image] = []
    readable: list[int] = []
    results: list[dict[str, Any]] = [{"path": path} for path in paths]
    for index, path in enumerate(paths):
        try:
            images.append(read_image(path))
            readable.append(index)
        except ImageError as error:
            results[index]["error"] = str(error)
    for index, answer in zip(readable, predict_images(model, images)):
        if "error" in answer:
            answer = {"error": f"{paths[index]}: {answer['error']}"}
        results[index].update(answer)
    return results


# --- command line --------------------------------------------------------------------------

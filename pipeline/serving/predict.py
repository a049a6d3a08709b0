"""Predict digits in photos and scans with a trained model (the `predict` command and the web page use it)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.data import IMAGE_SIDE
from pipeline.serving.classifier import as_classifier
from pipeline.serving.images import ImageError, prepare_image, read_image

log = logging.getLogger(__name__)

# --- model ---------------------------------------------------------------------------------


def probabilities(model: Any, pixels: np.ndarray) -> np.ndarray:
    """Softmax outputs (N, 10) for prepared pixels (N, 28, 28): a served classifier or a Keras model."""
    return as_classifier(model).probabilities(pixels)


def describe(probs: np.ndarray) -> dict[str, Any]:
    """The answer for one image: label, its confidence, and all ten probabilities."""
    label = int(np.argmax(probs))
    return {
        "label": label,
        "confidence": round(float(probs[label]), 6),
        "probabilities": [round(float(p), 6) for p in probs],
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
    for index, probs in zip(ready, probabilities(model, np.stack(pixels) if pixels else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE)))):
        results[index] = describe(probs)
    return results


def predict_files(model: Any, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One entry per path, in order: {path, label, confidence, probabilities} or {path, error}."""
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

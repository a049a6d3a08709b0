"""Predict digits in photos and scans with a trained model: `python -m pipeline predict IMAGE...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.errors import exit_on_user_error
from pipeline.serving.classifier import as_classifier, load_classifier
from pipeline.core.data import IMAGE_SIDE
from pipeline.serving.images import ImageError, prepare_image, read_image

log = logging.getLogger(__name__)

MODEL_OPTION_HELP = ("models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model or a .keras file "
                     "(default: models:/<tracking.registered_model>@champion from params.yaml)")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline predict",
        description="Predict the digit in each image (PNG, JPEG, BMP; any size, colour or grey).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="picture files, one digit each")
    parser.add_argument("--model", help=MODEL_OPTION_HELP)
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of lines")
    return parser.parse_args(argv)


def format_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['path']}: error: {result['error'].removeprefix(result['path'] + ': ')}"
    return f"{result['path']}: {result['label']} ({result['confidence']:.3f})"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every image was predicted, 1 when some could not be read."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.core.registry import champion_uri

    model = load_classifier(args.model or champion_uri())
    results = predict_files(model, args.images)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(format_line(result), file=sys.stderr if "error" in result else sys.stdout)
    return 1 if any("error" in result for result in results) else 0



if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m pipeline predict IMAGE...`: the digit in each picture, as lines or JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pipeline.commands.common import model_option
from pipeline.commands.common import parser as command_parser
from pipeline.core.errors import exit_on_user_error
from pipeline.core.runtime import setup_logging
from pipeline.registry.store import champion_uri
from pipeline.serving.classifier import load_classifier
from pipeline.serving.predict import predict_files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("predict", "Predict the digit in each image (PNG, JPEG, BMP; any size, colour or grey).",
                            model_option())
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="picture files, one digit each")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of lines")
    return parser.parse_args(argv)


def format_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['path']}: error: {result['error'].removeprefix(result['path'] + ': ')}"
    if result.get("is_digit") is False:
        return f"{result['path']}: not a digit (closest: {result['label']}, {result['confidence']:.2f})"
    return f"{result['path']}: {result['label']} ({result['confidence']:.3f})"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every image was predicted, 1 when some could not be read."""
    args = parse_args(argv)
    setup_logging(logging.WARNING)

    model = load_classifier(args.model or champion_uri())
    results = predict_files(model, args.images)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(format_line(result), file=sys.stderr if "error" in result else sys.stdout)
    return 1 if any("error" in result for result in results) else 0



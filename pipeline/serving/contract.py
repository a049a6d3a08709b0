"""The served model's input contract, checked before the model runs.

A request is what `mlflow models serve` takes for a tensor model: a JSON object with `inputs`
(or `instances`), holding images as nested lists, or `{"pixels": ...}` by input name. Each image
is 28x28 (optionally x1) raw pixels: finite numbers from 0 to 255. Anything else is a `BadRequest`
whose message names the problem and never quotes the body. Pixels that look scaled to 0-1 (none
above 1, some above 0), the commonest client mistake, are refused unless the request says so.
MLflow's `params` object may hold `"digit_verdict": false`, which leaves the `is_digit` key out of
the answer, and `"pixel_scale": "0-1"` for pixels scaled to 0-1.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Any

import numpy as np
import orjson

from pipeline.core.data import INPUT_SHAPE

INPUT_NAME = "pixels"  # the signature's input (core.model.model_signature)
INPUT_KEYS = ("inputs", "instances")
MAX_MESSAGE_CHARS = 600  # error bodies stay far under 4 KiB
EXAMPLE = '{"inputs": [[[0, 0, ...28 values], ...28 rows]]}'


class BadRequest(ValueError):
    """A request the model must not see; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message[:MAX_MESSAGE_CHARS])
        self.status = status


def read_json(body: bytes) -> Any:
    """The decoded body (orjson: strict JSON, so NaN and Infinity literals are refused); bad UTF-8,
    numbers beyond float64 and deep nesting are refused by name."""
    if not body.strip():
        raise BadRequest(f"empty request body; send JSON like {EXAMPLE}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        problem, where = error.msg, f"line {error.lineno} column {error.colno}"
    if "UTF-8" in problem:
        raise BadRequest("request body is not UTF-8 JSON")
    if "depth limit" in problem:
        raise BadRequest("JSON nested too deeply; images are nested 3 or 4 levels deep")
    if "infinity" in problem or re.search(rb"\bNaN\b|\bInfinity\b", body):
        raise BadRequest("pixels must be finite numbers from 0 to 255 (found NaN, Infinity or a number beyond "
                         "float64)")
    raise BadRequest(f"request body is not valid JSON ({problem} at {where}); send JSON like {EXAMPLE}")


def images_field(payload: Any) -> Any:
    """The images of a decoded request: its `inputs` or `instances` value."""
    if not isinstance(payload, dict):
        raise BadRequest(f"the JSON body must be an object with an \"inputs\" or \"instances\" key; send {EXAMPLE}")
    present = [key for key in INPUT_KEYS if key in payload]
    if len(present) != 1:
        found = "both" if present else "neither"
        raise BadRequest(f"the JSON object needs exactly one of \"inputs\" or \"instances\" (found {found}); "
                         "`dataframe_split` and `dataframe_records` do not apply to an image model")
    value = payload[present[0]]
    if isinstance(value, dict):  # {"inputs": {"pixels": [...]}}, by input name
        if set(value) != {INPUT_NAME}:
            raise BadRequest(f"named inputs must be {{\"{INPUT_NAME}\": [...]}}, the model's only input")
        value = value[INPUT_NAME]
    return value


def holds_boolean(value: Any) -> bool:
    """Whether nested lists hold a JSON true or false (NumPy would read it as 1 or 0)."""
    if isinstance(value, list):
        return any(holds_boolean(item) for item in value)
    return isinstance(value, bool)


def well_formed_pixels(value: list) -> np.ndarray | None:
    """(n, 28, 28) float32 from n well-formed 28x28 or 28x28x1 images of JSON numbers, without NumPy's
    slow walk over 784 one-number lists per image; None for anything else (`numpy_pixels` says what)."""
    side = INPUT_SHAPE[0]
    try:
        if set(map(len, value)) != {side}:
            return None
        rows = list(chain.from_iterable(value))
        if set(map(len, rows)) != {side}:
            return None
        cells = list(chain.from_iterable(rows))
        if type(cells[0]) is list:  # 28x28x1: every pixel a list of exactly one value
            cells = [pixel for (pixel,) in cells]
    except (TypeError, ValueError):  # a number where a list belongs, or a pixel list of another length
        return None
    if not set(map(type, cells)) <= {int, float}:  # strings, booleans, nulls, lists, objects
        return None
    with np.errstate(over="ignore"):
        pixels = np.array(cells, dtype=np.float32)
    return pixels.reshape(-1, side, side) if np.isfinite(pixels).all() else None


def numpy_pixels(value: list) -> np.ndarray:
    """(n, 28, 28) float32 by NumPy's reading of the nested lists, or BadRequest saying what is wrong."""
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):  # ragged lists
        raise BadRequest("images are not all 28x28: the nested lists have different lengths") from None
    if array.dtype.kind not in "iuf":
        raise BadRequest("pixels must be numbers (found strings, booleans, nulls, objects or ragged lists)")
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != INPUT_SHAPE[:2]:
        raise BadRequest(f"images have shape {array.shape[1:]}; each must be 28x28 (or 28x28x1)")
    with np.errstate(over="ignore"):  # numbers beyond float32 become inf, refused by the caller
        return array.astype(np.float32)


def as_images(value: Any, max_images: int, scale: str = "0-255", may_hold_booleans: bool = True) -> np.ndarray:
    """(n, 28, 28, 1) float32 raw 0-255 pixels from nested lists (`scale` "0-1": multiplied by 255),
    or BadRequest naming what is wrong. `may_hold_booleans` False skips the walk that finds a
    boolean among numbers (the body has no `true` or `false`)."""
    if not isinstance(value, list) or not value:
        raise BadRequest("no images: send a non-empty list of 28x28 images")
    if len(value) > max_images:
        raise BadRequest(f"{len(value)} images in one request; this server takes at most {max_images}: "
                         "split the batch", status=413)
    if may_hold_booleans and holds_boolean(value):
        raise BadRequest("pixels must be numbers (found strings, booleans, nulls, objects or ragged lists)")
    pixels = well_formed_pixels(value)
    if pixels is None:  # something is wrong: NumPy's reading of the lists says what
        pixels = numpy_pixels(value)
    if not np.isfinite(pixels).all():
        raise BadRequest("pixels must be finite numbers (found a value too large for float32)")
    low, high = float(pixels.min()), float(pixels.max())
    top = 1.0 if scale == "0-1" else 255.0
    if low < 0 or high > top:
        value = low if low < 0 else high
        raise BadRequest(f"pixel value {value:g} is out of range; pixels are raw grey levels from 0 to 255"
                         + (' (the request says "pixel_scale": "0-1")' if scale == "0-1" else ""))
    if scale == "0-1":
        return (pixels * 255.0).reshape(-1, *INPUT_SHAPE)
    if 0 < high <= 1.0:
        raise BadRequest(f"pixels look scaled to 0-1 (largest {high:g}); send raw grey levels from 0 to 255, or "
                         'say so with "params": {"pixel_scale": "0-1"}')
    return pixels.reshape(-1, *INPUT_SHAPE)


VERDICT_PARAM = "digit_verdict"  # in `params`: false leaves `is_digit` out of the answer


SCALE_PARAM, SCALES = "pixel_scale", ("0-255", "0-1")


def request_options(payload: dict) -> tuple[bool, str]:
    """From MLflow's `params` object: whether the answer carries `is_digit`, and the pixels' scale."""
    options = payload.get("params", {})
    if not isinstance(options, dict):
        raise BadRequest('"params" must be a JSON object, such as {"digit_verdict": false}')
    choice = options.get(VERDICT_PARAM, True)
    if not isinstance(choice, bool):
        raise BadRequest(f'params.{VERDICT_PARAM} must be true or false')
    scale = options.get(SCALE_PARAM, SCALES[0])
    if scale not in SCALES:
        raise BadRequest(f'params.{SCALE_PARAM} must be "0-255" (raw grey levels, the default) or "0-1"')
    return choice, scale


def parse_invocation(body: bytes, content_type: str | None, max_images: int) -> tuple[np.ndarray, bool]:
    """Validated images of an /invocations request body, and whether its answer carries `is_digit`."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise BadRequest(f"content type {media_type or 'none'!r} is not supported; send "
                         "Content-Type: application/json", status=415)
    payload = read_json(body)
    value = images_field(payload)  # refuses anything but a JSON object first
    verdict, scale = request_options(payload)
    return as_images(value, max_images, scale, may_hold_booleans=b"true" in body or b"false" in body), verdict



MAX_FEEDBACK_BYTES = 1024  # {"id": "<32 hex>-<n>", "label": "not-digit"} is under 80
FEEDBACK_EXAMPLE = '{"id": "<an id from prediction_ids>", "label": 7}  (or "label": "not-digit")'


def parse_feedback(body: bytes, content_type: str | None) -> tuple[str, int]:
    """The prediction id and label (0-9, or log.NOT_A_DIGIT) of a /feedback request body."""
    from pipeline.monitoring.log import PREDICTION_ID, parse_feedback_label

    if len(body) > MAX_FEEDBACK_BYTES:
        raise BadRequest(f"feedback bodies are at most {MAX_FEEDBACK_BYTES} bytes; send {FEEDBACK_EXAMPLE}", status=413)
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise BadRequest(f"content type {media_type or 'none'!r} is not supported; send "
                         "Content-Type: application/json", status=415)
    payload = read_json(body)
    if not isinstance(payload, dict) or set(payload) != {"id", "label"}:
        raise BadRequest(f"feedback must be a JSON object with exactly the keys id and label; send {FEEDBACK_EXAMPLE}")
    prediction_id = payload["id"]
    if not isinstance(prediction_id, str) or not PREDICTION_ID.match(prediction_id):
        raise BadRequest(f'"id" is not a prediction id; send one from an answer\'s prediction_ids: {FEEDBACK_EXAMPLE}')
    try:
        return prediction_id, parse_feedback_label(payload["label"])
    except ValueError as problem:
        raise BadRequest(str(problem)) from None


def label_name(label: int) -> int | str:
    """A stored feedback label as clients write it: the digit, or "not-digit"."""
    from pipeline.monitoring.log import NOT_A_DIGIT

    return "not-digit" if label == NOT_A_DIGIT else label

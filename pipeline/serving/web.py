"""A small web page to draw or upload a digit and see what the model predicts.

    python -m pipeline web [--host 127.0.0.1] [--port 5005] [--model URI]

POST /api/predict takes a multipart upload (field `image`) or JSON
{"image": "data:image/png;base64,..."} and answers {label, confidence, probabilities, is_digit,
digit_score, model_version, prediction_id} (the verdict's two only for a model registered with it,
the id only while the prediction log is on); POST /feedback {"id", "label"} labels an answer;
problems are answered as JSON {"error": "..."} with status 400, 413 or 503. The page runs on
waitress (a production WSGI server); at most MAX_DECODES pictures are decoded at once (503 beyond),
and pictures over images.MAX_PIXELS are refused before they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import threading
import time
from typing import Any

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from pipeline.core.errors import PipelineError, redact
from pipeline.registry.store import champion_uri
from pipeline.serving.images import ImageError, prepare_image, read_image
from pipeline.serving.classifier import load_classifier
from pipeline.serving.following import AliasFollower
from pipeline.monitoring.log import Entry, LogOff, StoreUnavailable, UnknownPrediction, new_request_id, prediction_ids
from pipeline.serving.contract import MAX_FEEDBACK_BYTES, BadRequest, label_name, parse_feedback
from pipeline.serving.predict import describe
from pipeline.serving.served import Answers

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_DECODES = 4  # pictures decoded at once (each may take up to MAX_PIXELS of memory); more get 503
THREADS = 8  # waitress worker threads
DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+(;[a-z0-9=.+-]+)*;base64,(?P<payload>.*)$", re.IGNORECASE | re.DOTALL)
USAGE = 'send a multipart file field "image", or JSON {"image": "data:image/png;base64,..."}'


class BadUpload(Exception):
    """A request whose fields or image cannot be used; answered with 400 and its message."""


class Busy(Exception):
    """Every decode slot is taken; answered with 503."""


class LazyModel:
    """Loads the model on first use, once, even with concurrent requests; served from an alias, it
    then follows it every `refresh_s` seconds (`following.AliasFollower`)."""

    def __init__(self, uri: str, refresh_s: float = 0.0) -> None:
        self.uri = uri
        self.refresh_s = refresh_s
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> Any:
        with self._lock:
            if self._model is None:
                log.info("loading model %s", self.uri)
                self._model = AliasFollower(self.uri, self.refresh_s, load_classifier)
                self._model.start()
            return self._model

    def predict(self, pixels: Any) -> tuple[Answers, dict[str, Any]]:
        """The answers for one picture (28, 28), and its JSON; without a verdict, `digit_check` says why."""
        model = self.get()
        with self._lock:  # Keras models are not documented as safe for concurrent calls
            answers = model.answer(pixels[None])
        answer = describe(answers, 0)
        return answers, answer if "is_digit" in answer else {**answer, "digit_check": model.missing_verdict}


def too_large_body(max_upload_bytes: int) -> bytes:
    """The JSON answer to an upload over the limit (Flask's and waitress's 413 alike)."""
    return json.dumps({"error": f"upload too large; send an image of at most "
                                f"{max_upload_bytes / (1024 * 1024):g} MB"}).encode()


def decode_data_url(value: Any) -> bytes:
    """The bytes of a `data:image/...;base64,` URL; BadUpload if it is anything else."""
    if not isinstance(value, str):
        raise BadUpload(f'"image" must be a data URL string; {USAGE}')
    match = DATA_URL.match(value.strip())
    if not match:
        raise BadUpload(f'"image" is not a data:image/...;base64, URL; {USAGE}')
    try:
        return base64.b64decode(match["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise BadUpload('"image" holds invalid base64 data') from None


def upload_json(body: bytes) -> Any:
    """The decoded JSON body of an upload; BadUpload naming the problem when it is not JSON."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadUpload(f"request body is not UTF-8 JSON; {USAGE}") from None
    except json.JSONDecodeError as error:
        raise BadUpload(f"request body is not valid JSON ({error.msg} at line {error.lineno} column "
                        f"{error.colno}); {USAGE}") from None
    except RecursionError:
        raise BadUpload(f"JSON nested too deeply; {USAGE}") from None


def image_bytes_from_request() -> tuple[bytes, str]:
    """The uploaded picture's bytes and a name for messages, from a file field or JSON."""
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        upload = request.files.get("image")
        if upload is None:
            raise BadUpload(f"no file field \"image\" in the upload; {USAGE}")
        return upload.read(), upload.filename or "upload"
    if request.is_json:
        payload = upload_json(request.get_data(cache=False))
        if not isinstance(payload, dict) or "image" not in payload:
            raise BadUpload(f'JSON body needs an "image" key; {USAGE}')
        return decode_data_url(payload["image"]), "drawing"
    raise BadUpload(f"unsupported content type {request.mimetype or 'none'!r}; {USAGE}")


def create_app(model_uri: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_decodes: int = MAX_DECODES, refresh_s: float = 0.0, prediction_log: Any = None) -> Flask:
    """The web app; the model (by default the project's champion) is loaded at the first prediction
    (or by `warm_up`), and from then on follows its alias every `refresh_s` seconds (0: never). Every
    answer goes to `prediction_log` (`monitoring.log`; None: not logged)."""
    model_uri = model_uri or champion_uri()
    prediction_log = prediction_log or LogOff("not configured")
    logged = not isinstance(prediction_log, LogOff)
    app = Flask(__name__)
    app.extensions["prediction_log"] = prediction_log
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = max_upload_bytes
    app.extensions["mnist_model"] = LazyModel(model_uri, refresh_s)
    limit_mb = max_upload_bytes / (1024 * 1024)
    decode_slots = threading.BoundedSemaphore(max_decodes)

    @app.get("/")
    def index() -> str:
        return render_template("index.html", model_uri=model_uri, limit_mb=f"{limit_mb:g}")

    @app.get("/healthz")
    def health() -> Any:
        model: LazyModel = app.extensions["mnist_model"]
        return jsonify(status="ok", model=model.uri, loaded=model.loaded,
                       **({"version": model.get().version} if model.loaded else {}),
                       prediction_log=prediction_log.stats())

    @app.post("/api/predict")
    def predict() -> Any:
        started = time.perf_counter()
        data, name = image_bytes_from_request()
        if not data:
            raise BadUpload(f"{name} is empty; {USAGE}")
        if not decode_slots.acquire(timeout=1.0):
            raise Busy(f"{max_decodes} pictures are being decoded; retry shortly")
        try:
            pixels = prepare_image(read_image(io.BytesIO(data), name=name))
        except ImageError as error:
            raise BadUpload(str(error)) from None
        finally:
            decode_slots.release()
        model: LazyModel = app.extensions["mnist_model"]
        answers, answer = model.predict(pixels)
        if logged:
            request_id = new_request_id()
            answer["prediction_id"] = prediction_ids(request_id, 1)[0]
            prediction_log.record(Entry(time.time(), request_id, "web", model.uri, answers.version, pixels[None],
                                        answers.probabilities, answers.is_digit, answers.scores,
                                        (time.perf_counter() - started) * 1000))
        return jsonify(answer)

    @app.post("/feedback")
    def feedback() -> Any:
        if (request.content_length or 0) > MAX_FEEDBACK_BYTES:
            raise BadRequest(f"feedback bodies are at most {MAX_FEEDBACK_BYTES} bytes", status=413)
        prediction_id, label = parse_feedback(request.get_data(cache=False), request.content_type)
        try:
            prediction_log.save_feedback(prediction_id, label)
        except UnknownPrediction:
            return jsonify(error="no logged prediction has this id; send the prediction_id of an answer"), 404
        except StoreUnavailable as error:
            return jsonify(error=str(error)), 503
        return jsonify(id=prediction_id, label=label_name(label))

    @app.errorhandler(BadRequest)
    def bad_feedback(error: BadRequest) -> Any:
        return jsonify(error=str(error)), error.status

    @app.errorhandler(BadUpload)
    def bad_upload(error: BadUpload) -> Any:
        return jsonify(error=str(error)), 400

    @app.errorhandler(Busy)
    def busy(error: Busy) -> Any:
        return jsonify(error=str(error)), 503

    @app.errorhandler(PipelineError)
    def model_unavailable(error: PipelineError) -> Any:
        log.error("%s", error)
        return jsonify(error=redact(str(error))), 503

    @app.errorhandler(413)
    def too_large(_: HTTPException) -> Any:
        return app.response_class(too_large_body(max_upload_bytes), status=413, mimetype="application/json")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Any:
        if request.path.startswith("/api/"):
            return jsonify(error=f"{error.name}: {error.description}"), error.code
        return error

    return app


def warm_up(app: Flask) -> None:
    """Load the model now, so that a bad --model fails before the server starts."""
    app.extensions["mnist_model"].get()

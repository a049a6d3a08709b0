"""Serve a registered model over HTTP, speaking MLflow's scoring protocol, fast and guarded.

    python -m pipeline serve [--model URI] [--host 127.0.0.1] [--port 5001] [--max-body-mb 16]
                             [--max-images 1000] [--max-concurrent 64] [--timeout-s 30]

Clients of `mlflow models serve` work unchanged: POST /invocations with `inputs` or `instances`
answers {"predictions": [[10 probabilities], ...]}; GET /ping, /health and /version answer as there.
What differs:
- a version registered with its digit verdict also answers "is_digit": [true|false, ...], one per
  image (`"params": {"digit_verdict": false}` in the request leaves it out);
- the header `X-Model-Version` names the registered version that answered; served from an alias,
  the server follows it (`following.AliasFollower`, started and stopped with the app);
- the registered version's ONNX file runs on ONNX Runtime after its sha256 is checked
  (`classifier.load_classifier`), with concurrent requests micro-batched (`batching`);
- the input contract (`contract`) is checked before the model runs: bad input gets a 4xx JSON
  error {error_code, message} that never quotes the body;
- limits: a body over --max-body-mb gets 413 (at once when Content-Length says so, or as soon as a
  chunked body streams past it), requests beyond --max-concurrent get 503, and a request not done
  within --timeout-s (a slow body included) gets 503; an answer sent before the body is read reaches
  clients that write the whole body first (urllib), since closing lingers (`lingering`);
- SIGTERM or Ctrl+C: the server stops accepting, lets requests in flight finish, and exits
  (within GRACEFUL_SHUTDOWN_S).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_BODY_MB = 16.0  # about 2,900 MNIST images as JSON floats, 4,000 as integers
DEFAULT_MAX_IMAGES = 1000
DEFAULT_MAX_CONCURRENT = 64
DEFAULT_TIMEOUT_S = 30.0
VERSION_HEADER = "X-Model-Version"  # the registered version that answered
GRACEFUL_SHUTDOWN_S = 8.0  # in-flight requests get this long after SIGTERM

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised from `receive` inside the wrapped app when the body passes the limit."""


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when absent (chunked) or unreadable."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# MLflow's error code (mlflow.protos.databricks_pb2.ErrorCode) for each status this server answers:
# MLflow's own for 400, 404, 500 and 503; it has none for 405 (a route that exists for another
# method), 413 or 415, so the nearest: the endpoint is not there, a limit is exceeded, a bad request
ERROR_CODES = {400: "BAD_REQUEST", 404: "ENDPOINT_NOT_FOUND", 405: "ENDPOINT_NOT_FOUND", 413: "RESOURCE_LIMIT_EXCEEDED",
               415: "BAD_REQUEST", 500: "INTERNAL_ERROR", 503: "TEMPORARILY_UNAVAILABLE"}


def error_body(status: int, message: str) -> bytes:
    """MLflow's error shape: {"error_code": ..., "message": ...}, the code by `ERROR_CODES`."""
    code = ERROR_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
    return json.dumps({"error_code": code, "message": message}).encode()


def too_large_body(max_bytes: int) -> bytes:
    return error_body(413, f"request body is larger than the server's limit of "
                      f"{max_bytes / MIB:g} MiB; split the batch into smaller requests, or restart the "
                      "server with a larger --max-body-mb")


async def send_error(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """ASGI middleware: HTTP requests whose body exceeds max_bytes get 413 instead of the app's answer.

    A chunked body is counted as the app reads it; once past the limit, the app's `receive` raises
    and whatever the app then sends (MLflow's stack answers 500) is dropped in favour of the 413.
    The server discards the rest of the body and keeps the connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_bytes:
            await self.reject(send)
            return
        received = 0
        overflowed = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflowed = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if overflowed and not response_started:
                return  # the app's answer to the aborted read; the 413 replaces it
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not overflowed or response_started:
                raise
        if overflowed and not response_started:
            await self.reject(send)

    async def reject(self, send: Send) -> None:
        await send_error(send, 413, too_large_body(self.max_bytes))


class ConcurrencyLimit:
    """ASGI middleware: HTTP requests beyond `max_concurrent` in flight get 503 before their body is read."""

    def __init__(self, app: ASGIApp | None, max_concurrent: int) -> None:
        self.app = app  # may be set after construction, for an app that reads `in_flight`
        self.max_concurrent = max_concurrent
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            await send_error(send, 503, error_body(503, f"more than {self.max_concurrent} requests "
                                                   "in flight; retry shortly"))
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now out of the garbage collector's sight
    (`gc.freeze`). Both servers call it once their model is loaded: the libraries they imported
    (MLflow, SQLAlchemy, NumPy: some 200,000 objects) are never traversed again, so the collections
    that each request's JSON lists trigger stay small."""
    import gc

    gc.collect()
    gc.freeze()


def mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def build_app(model: Any, max_bytes: int, max_images: int = DEFAULT_MAX_IMAGES,
              max_concurrent: int = DEFAULT_MAX_CONCURRENT, timeout_s: float = DEFAULT_TIMEOUT_S,
              prediction_log: Any = None, model_uri: str = "") -> ASGIApp:
    """The scoring app: MLflow's routes over `model.answer` (a `served.ServedModel`), micro-batched,
    with limits; every answer goes to `prediction_log` (`monitoring.log`; None: not logged)."""
    from pipeline.monitoring.log import LogOff

    prediction_log = prediction_log or LogOff("not configured")
    logged = not isinstance(prediction_log, LogOff)
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from pipeline.serving.batching import MicroBatcher
    from pipeline.monitoring.log import Entry, StoreUnavailable, UnknownPrediction, new_request_id, prediction_ids
    from pipeline.serving.contract import BadRequest, label_name, parse_feedback, parse_invocation

    batcher = MicroBatcher(model.answer, max_images)
    limit = ConcurrencyLimit(None, max_concurrent)  # its count of requests in flight tells the batcher

    def error(status: int, message: str) -> Response:
        return Response(error_body(status, message), status_code=status, media_type="application/json")

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        images, with_verdict = parse_invocation(await request.body(), request.headers.get("content-type"), max_images)
        answers = await batcher(images, alone=limit.in_flight == 1)
        body = {"predictions": answers.probabilities.tolist()}
        if with_verdict and answers.is_digit is not None:
            body["is_digit"] = answers.is_digit.tolist()
        headers = {} if answers.version is None else {VERSION_HEADER: answers.version}
        if logged:
            request_id = new_request_id()
            body["prediction_ids"] = prediction_ids(request_id, len(answers))
            prediction_log.record(Entry(time.time(), request_id, "serve", model_uri, answers.version, images,
                                        answers.probabilities, answers.is_digit, answers.scores,
                                        (time.perf_counter() - started) * 1000))
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    async def feedback(request: Request) -> Response:
        try:
            prediction_id, label = parse_feedback(await request.body(), request.headers.get("content-type"))
            await asyncio.to_thread(prediction_log.save_feedback, prediction_id, label)
        except BadRequest as problem:
            return error(problem.status, str(problem))
        except UnknownPrediction:
            return error(404, "no logged prediction has this id; send an id from an answer's prediction_ids")
        except StoreUnavailable as problem:
            return error(503, str(problem))
        return Response(json.dumps({"id": prediction_id, "label": label_name(label)}), media_type="application/json")

    async def invocations(request: Request) -> Response:
        try:
            async with asyncio.timeout(timeout_s):
                return await predict(request)
        except BadRequest as problem:
            return error(problem.status, str(problem))
        except TimeoutError:
            return error(503, f"the request took longer than {timeout_s:g} s (body upload "
                         "included); send smaller batches or retry")
        except BodyTooLarge:
            raise  # BodySizeLimit answers 413
        except Exception:  # the trace goes to the server's log, never to the client
            log.exception("prediction failed")
            return error(500, "the model failed on this request; the server log has the details")

    async def ping(_: Request) -> Response:
        return Response("\n", media_type="application/json")

    async def health(_: Request) -> Response:
        loaded = getattr(model, "version", None)
        return Response(json.dumps({"status": "ok", "model": model_uri, "model_version": loaded,
                                    "prediction_log": prediction_log.stats()}), media_type="application/json")

    async def version(_: Request) -> Response:
        return Response(mlflow_version(), media_type="application/json")

    async def http_error(_: Request, problem: HTTPException) -> Response:
        return error(problem.status_code, problem.detail or "request failed")

    @asynccontextmanager
    async def lifespan(_):
        batcher.start()
        if hasattr(model, "start"):
            model.start()
        freeze_startup_heap()
        yield
        if hasattr(model, "stop"):
            model.stop()
        await batcher.stop()
        await asyncio.to_thread(prediction_log.stop)

    app = Starlette(
        routes=[Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping, methods=["GET"]),
                Route("/health", health, methods=["GET"]), Route("/version", version, methods=["GET"]),
                Route("/feedback", feedback, methods=["POST"])],
        exception_handlers={HTTPException: http_error}, lifespan=lifespan,
    )
    app.state.batcher = batcher
    limit.app = BodySizeLimit(app, max_bytes)
    return limit


def listen(host: str, port: int) -> socket.socket:
    """A bound listening socket, so a busy port fails with one line before uvicorn starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = socket.create_server((host, port), family=family)
        # accepted connections inherit it: uvicorn writes headers and body apart, and Nagle's algorithm
        # would hold the body until the client's delayed ACK (40 ms per request)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return server
    except OSError as error:  # create_server's message repeats the address; errno's is enough
        reason = os.strerror(error.errno) if (error.errno or 0) > 0 else error.strerror
        raise PipelineError(f"cannot listen on {host}:{port} ({reason}); pass another --port or --host") from None

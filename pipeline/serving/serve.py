"""Serve a registered model over HTTP: MLflow's own scoring app behind a request-size limit.

    python -m pipeline serve [--model URI] [--host 127.0.0.1] [--port 5001] [--max-body-mb 16]

`mlflow models serve` reads any body whole into memory, however large. This runs the same app
(`mlflow.pyfunc.scoring_server.init`: /invocations, /ping, /health and /version answer exactly as
there) behind an ASGI middleware that answers 413 once a body is over the limit: at once when
Content-Length says so, or as soon as a chunked body streams past it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pipeline.core.errors import PipelineError, exit_on_user_error

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_BODY_MB = 16.0  # about 2,900 MNIST images as JSON floats, 4,000 as integers

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


def too_large_body(max_bytes: int) -> bytes:
    """MLflow's error shape ({error_code, message}) for a body over the limit."""
    message = (
        f"request body is larger than the server's limit of {max_bytes / MIB:g} MiB; "
        "split the batch into smaller requests, or restart the server with a larger --max-body-mb"
    )
    return json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}).encode()


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
        body = too_large_body(self.max_bytes)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def load_pyfunc(uri: str) -> Any:
    """The model as MLflow's pyfunc, from the project's store (or MLFLOW_TRACKING_URI)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from pipeline.core.tracking import configure_tracking

    store = configure_tracking()
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PipelineError(
            f"cannot load model {uri!r} from MLflow at {store} ({first_line}); "
            "train and promote a model first, or pass --model with a models:/ or runs:/ URI or an MLflow model folder"
        ) from None


def build_app(model: Any, max_bytes: int) -> ASGIApp:
    from mlflow.pyfunc import scoring_server

    return BodySizeLimit(scoring_server.init(model), max_bytes)


def listen(host: str, port: int) -> socket.socket:
    """A bound listening socket, so a busy port fails with one line before uvicorn starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as error:  # create_server's message repeats the address; errno's is enough
        reason = os.strerror(error.errno) if (error.errno or 0) > 0 else error.strerror
        raise PipelineError(f"cannot listen on {host}:{port} ({reason}); pass another --port or --host") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline serve",
        description="Serve a model with MLflow's scoring app (/invocations, /ping) and a request-size limit.",
    )
    parser.add_argument(
        "--model", help="models:/ or runs:/ URI or MLflow model folder (default: models:/<tracking.registered_model>@champion)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    parser.add_argument(
        "--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
        help=f"larger request bodies get 413, in MiB (default: {DEFAULT_MAX_BODY_MB:g})",
    )
    args = parser.parse_args(argv)
    if args.max_body_mb <= 0:
        parser.error("--max-body-mb must be positive")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from pipeline.core.runtime import setup_logging

    args = parse_args(argv)
    setup_logging()
    from pipeline.core.registry import champion_uri

    uri = args.model or champion_uri()
    max_bytes = int(args.max_body_mb * MIB)
    server_socket = listen(args.host, args.port)  # a busy port fails before the model loads
    app = build_app(load_pyfunc(uri), max_bytes)
    netloc = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    log.info("serving %s at http://%s/invocations; bodies over %g MiB get 413", uri, netloc, args.max_body_mb)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[server_socket])
    return 0



if __name__ == "__main__":
    raise SystemExit(main())

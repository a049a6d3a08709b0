"""The request-size middleware of `python -m pipeline serve`, around a tiny Starlette app, in-process."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.serving.serve import BodySizeLimit, declared_length

LIMIT = 100


async def echo_length(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


def call(chunks: list[bytes], content_length: int | None) -> tuple[int, dict, int]:
    """Status, JSON answer, and how many chunks the app pulled, for one POST through the middleware."""
    app = BodySizeLimit(Starlette(routes=[Route("/", echo_length, methods=["POST"])]), LIMIT)
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1)}
    queue = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)]
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], json.loads(body), pulled


def test_a_body_within_the_limit_reaches_the_app():
    assert call([b"x" * 60, b"x" * 40], content_length=None)[:2] == (200, {"length": 100})


def test_a_declared_length_over_the_limit_is_refused_unread():
    status, answer, pulled = call([b"x" * 101], content_length=101)
    assert (status, answer["error_code"], pulled) == (413, "RESOURCE_LIMIT_EXCEEDED", 0)
    assert "--max-body-mb" in answer["message"] and "split the batch" in answer["message"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit():
    status, answer, pulled = call([b"x" * 60] * 10, content_length=None)
    assert (status, answer["error_code"], pulled) == (413, "RESOURCE_LIMIT_EXCEEDED", 2)


def test_a_body_longer_than_declared_is_still_counted():
    assert call([b"x" * 60] * 3, content_length=50)[0] == 413


@pytest.mark.parametrize(("headers", "expected"), [([], None), ([(b"Content-Length", b"12")], 12),
                                                   ([(b"content-length", b"twelve")], None)])
def test_declared_length(headers, expected):
    assert declared_length({"headers": headers}) == expected


class ConstantModel:
    """Ten equal probabilities per image; enough for the app's start-up and shut-down."""

    version = "1"

    def answer(self, pixels):
        import numpy as np

        from pipeline.serving.served import Answers

        return Answers(np.full((len(pixels), 10), 0.1, np.float32), version=self.version)


def test_serve_freezes_its_startup_heap_when_it_starts():
    """Once started, the objects of start-up (libraries, the model) are out of the garbage collector's
    sight (`gc.freeze`), so per-request collections do not traverse them."""
    import gc

    from pipeline.serving.serve import build_app

    app = build_app(ConstantModel(), LIMIT)
    gc.unfreeze()
    frozen: list[int] = []

    async def lifespan() -> None:
        steps = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        sent: list[str] = []

        async def receive() -> dict:
            if sent:  # started: look before shutting down
                frozen.append(gc.get_freeze_count())
            return next(steps)

        async def send(message: dict) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    try:
        asyncio.run(lifespan())
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 10_000  # pytest, NumPy and Starlette alone are far more objects

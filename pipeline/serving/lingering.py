"""Lingering close for both servers, after nginx's `lingering_close`: an early answer reaches every client.

A server that answers before it has read the whole body (413 from Content-Length, 503 busy, 415) and
then closes with request bytes still unread makes the kernel send a TCP RST, and the RST can discard
the answer before a client that writes its whole body first (Python's urllib) reads it: the client
sees "connection reset" instead of the 413. So instead of closing at once, a server here:
1. shuts down its write side once the answer is flushed (the client sees the answer, then EOF);
2. reads and discards what still comes, for at most LINGER_S seconds in all, LINGER_IDLE_S seconds
   without data, and LINGER_MAX_BYTES bytes;
3. closes when the client closes, or when a bound is reached.

Nothing discarded is kept, so memory stays bounded by one read. `serve` gets it through uvicorn's
httptools protocol (`LingeringHttpToolsProtocol`, passed as `uvicorn.Config(http=...)`), `web` through
waitress's channel (`lingering_server`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask

LINGER_S = 10.0  # longest a closing connection keeps draining the client's body
LINGER_IDLE_S = 2.0  # a client silent this long while draining is closed
LINGER_MAX_BYTES = 256 * 1024 * 1024  # most bytes drained before closing anyway


class Drain:
    """The bounds of one lingering close: when it began, when data last came, how much came."""

    def __init__(self, now: float) -> None:
        self.started = self.last_data = now
        self.drained = 0

    def take(self, size: int, now: float) -> bool:
        """Count `size` discarded bytes; False once a bound is passed (the connection should close)."""
        self.drained += size
        self.last_data = now
        return not self.over(now)

    def over(self, now: float) -> bool:
        return (now - self.started > LINGER_S or now - self.last_data > LINGER_IDLE_S
                or self.drained > LINGER_MAX_BYTES)


# --- serve: uvicorn ------------------------------------------------------------------------------

class LingeringTransport:
    """The transport uvicorn's protocol sees: `close()` lingers while a request body is still arriving."""

    def __init__(self, transport: asyncio.Transport, protocol: LingeringHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.drain is not None or self._transport.is_closing()

    def close(self) -> None:
        if self._protocol.drain is not None:
            return  # already closing; the drain's bounds end it
        if self._protocol.body_pending and not self._transport.is_closing() and self._transport.can_write_eof():
            self._protocol.start_lingering()
        else:
            self._transport.close()


class LingeringHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection with a request body still unread by lingering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_pending = False  # between a request's first byte and its end
        self.drain: Drain | None = None
        self._drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self))  # type: ignore[arg-type]
        self.raw_transport = transport

    def on_message_begin(self) -> None:
        self.body_pending = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self.body_pending = False
        super().on_message_complete()

    def start_lingering(self) -> None:
        self.drain = Drain(time.monotonic())
        self.raw_transport.write_eof()  # sent once the answer is flushed
        self.raw_transport.resume_reading()  # flow control may have paused it for a large body
        self._drain_timer = self.loop.call_later(LINGER_IDLE_S, self._check_drain)

    def _check_drain(self) -> None:
        if self.drain is not None and self.drain.over(time.monotonic()):
            self.raw_transport.close()
        else:
            self._drain_timer = self.loop.call_later(LINGER_IDLE_S / 4, self._check_drain)

    def data_received(self, data: bytes) -> None:
        if self.drain is None:
            super().data_received(data)
        elif not self.drain.take(len(data), time.monotonic()):
            self.raw_transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)


# --- web: waitress -------------------------------------------------------------------------------

class LingeringChannel(HTTPChannel):
    """waitress's channel, lingering instead of closing after an answer, and answering its own 413
    (a body over `max_request_body_size`, refused before the app sees it) in the app's words."""

    drain: Drain | None = None
    too_large_body: Callable[[], bytes] = staticmethod(lambda: b"")  # set by `lingering_server`

    def readable(self) -> bool:
        if self.drain is None:
            return super().readable()
        if self.drain.over(time.monotonic()):  # polled at least every second by waitress's loop
            self.will_close = True
            return False
        return True

    def writable(self) -> bool:
        return self.will_close if self.drain is not None else super().writable()

    def handle_write(self) -> None:
        if self.drain is None:
            super().handle_write()
        else:
            super().handle_close()

    def handle_close(self) -> None:
        # waitress closes here once an answer with close_when_flushed is flushed (will_close set)
        if self.drain is None and self.will_close and self.connected and not self.total_outbufs_len:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                super().handle_close()
                return
            self.drain = Drain(time.monotonic())
            self.will_close = False
            return
        super().handle_close()

    def handle_read(self) -> None:
        if self.drain is None:
            super().handle_read()
            return
        try:
            data = self.recv(self.adj.recv_bytes)
        except OSError:
            data = b""
        if not data or not self.drain.take(len(data), time.monotonic()):
            super().handle_close()


class JsonErrorTask(ErrorTask):
    """waitress's error answer, with the app's JSON body for a body over the limit."""

    def execute(self) -> None:
        if self.request.error.code != 413:
            super().execute()
            return
        body = self.channel.too_large_body()
        self.status = "413 Request Entity Too Large"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


def lingering_server(app: Any, too_large_body: Callable[[], bytes], **adjustments: Any) -> TcpWSGIServer:
    """A waitress server on one TCP address whose connections linger (`LingeringChannel`) and whose
    own 413 carries `too_large_body()`; `adjustments` are waitress's (host, port, threads, ...)."""
    channel = type("Channel", (LingeringChannel,), {"error_task_class": JsonErrorTask,
                                                    "too_large_body": staticmethod(too_large_body)})
    server = type("Server", (TcpWSGIServer,), {"channel_class": channel})
    return server(app, **adjustments)

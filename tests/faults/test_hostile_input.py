"""Hostile input and load against the real servers on loopback: `python -m pipeline serve` (the
registered version, ONNX Runtime, uvicorn) and `python -m pipeline web` (waitress).

Every refusal is a 4xx JSON error under 4 KiB that names the problem, never a 5xx, never the body
echoed back, never a stack trace; bombs and big bodies stay within memory bounds; 8 clients for 30 s
lose nothing; SIGTERM under load lets requests in flight finish and exits within 10 s.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.serving.fixtures import REPO, mnist_digit, mnist_file, register_model, tiny_model_path, vertical_one  # noqa: F401

pytestmark = pytest.mark.slow

MARKER = "ECHO-MARKER-7f3a"  # put into hostile bodies; must never come back
MODEL = "mnist-cnn-hostile"


# --- servers ---------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


class Running:
    """A server process on a free port, with its peak resident memory sampled every 20 ms."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, ready_path: str) -> None:
        self.port = free_port()
        self.log = log
        with log.open("w") as stream:
            self.process = subprocess.Popen([*command, "--port", str(self.port)], cwd=REPO, env=env, stdout=stream,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not self.answers(ready_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{command} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        self.peak_mib = 0.0
        self.sampler_stopped: str | None = None  # why sampling ended early: a stale peak must fail the test
        self.sampling = True
        threading.Thread(target=self.sample, daemon=True).start()

    def answers(self, path: str) -> bool:
        try:
            return request(self.port, "GET", path)[0] == 200
        except OSError:
            return False

    def sample(self) -> None:
        while self.sampling and self.process.poll() is None:
            try:
                self.peak_mib = max(self.peak_mib, rss_mib(self.process.pid))
            except Exception as error:
                self.sampler_stopped = repr(error)
                return
            time.sleep(0.02)
        if self.sampling:
            self.sampler_stopped = f"the server exited ({self.process.returncode})"

    def peak(self) -> float:
        """The peak resident memory so far (MiB), failing the test if sampling has stopped."""
        assert self.sampler_stopped is None and self.process.poll() is None, self.sampler_stopped
        return self.peak_mib

    def reset_peak(self) -> None:
        self.peak_mib = rss_mib(self.process.pid)

    def stop(self) -> None:
        self.sampling = False
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def store(tiny_model_path, mnist_file, tmp_path_factory):
    """A scratch store holding the tiny model as version 1 (registered the project's way)."""
    folder = tmp_path_factory.mktemp("hostile")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)  # mlflow.set_registry_uri exports it: never inherit another test's
    try:
        register_model(tiny_model_path, MODEL, mnist_file, folder / "artifacts")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {"env": {**env, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}, "folder": folder}


def log_in(store) -> list[str]:
    """The servers log every answer, hostile ones included, to a store in the test's folder."""
    return ["--log-storage", f"sqlite:///{store['folder'] / 'predictions.db'}"]


def start_serve(store, *flags: str) -> Running:
    command = [sys.executable, "-m", "pipeline", "serve", "--model", f"models:/{MODEL}/1", *log_in(store), *flags]
    return Running(command, store["env"], store["folder"] / f"serve-{time.monotonic_ns()}.log", "/ping")


@pytest.fixture(scope="module")
def served(store):
    server = start_serve(store, "--max-body-mb", "1", "--max-images", "50")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web(store):
    command = [sys.executable, "-m", "pipeline", "web", "--model", f"models:/{MODEL}/1", *log_in(store)]
    server = Running(command, store["env"], store["folder"] / "web.log", "/healthz")
    yield server
    server.stop()


def image_body(images: np.ndarray, key: str = "inputs") -> bytes:
    return json.dumps({key: images.astype(int).tolist()}).encode()


def assert_refusal(status: int, body: bytes, what: str) -> None:
    assert 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    assert len(body) < 4096, what
    answer = json.loads(body)
    message = answer.get("message") or answer.get("error")
    assert isinstance(message, str) and message, what
    assert MARKER not in body.decode() and "Traceback" not in body.decode(), what


# --- served model ----------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return ('{"inputs": ' + "[" * depth + "]" * depth + "}").encode()


def one_image(value: str) -> bytes:
    """A 28x28 image of zeros with `value` (raw JSON text) as its first pixel."""
    rows = [", ".join([value] + ["0"] * 27)] + [", ".join(["0"] * 28)] * 27
    return ('{"inputs": [[' + ", ".join(f"[{row}]" for row in rows) + "]]}").encode()


JSON = {"Content-Type": "application/json"}
ZEROS = np.zeros((1, 28, 28))
SERVE_HOSTILE = {
    "no content type": (image_body(ZEROS), {}),
    "wrong content type": (image_body(ZEROS), {"Content-Type": "text/plain"}),
    "form content type": (b"inputs=" + MARKER.encode(), {"Content-Type": "application/x-www-form-urlencoded"}),
    "empty body": (b"", JSON),
    "invalid JSON": (f'{{"inputs": [{MARKER}'.encode(), JSON),
    "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), JSON),
    "not UTF-8": (b'{"inputs": "\xff\xfe' + MARKER.encode() + b'"}', JSON),
    "nested 100,000 deep": (nested(100_000), JSON),
    "NaN literal": (one_image("NaN"), JSON),
    "Infinity literal": (one_image("Infinity"), JSON),
    "1e400": (one_image("1e400"), JSON),
    "negative pixel": (one_image("-1"), JSON),
    "pixel above 255": (one_image("256"), JSON),
    "strings": (json.dumps({"inputs": [[[MARKER] * 28] * 28]}).encode(), JSON),
    "booleans": (json.dumps({"inputs": [[[True] * 28] * 28]}).encode(), JSON),
    "nulls": (json.dumps({"inputs": [[[None] * 28] * 28]}).encode(), JSON),
    "wrong shape": (image_body(np.zeros((1, 27, 28))), JSON),
    "ragged rows": (json.dumps({"inputs": [[[0] * 28] * 27 + [[0] * 5]]}).encode(), JSON),
    "empty inputs": (b'{"inputs": []}', JSON),
    "no inputs key": (json.dumps({MARKER: 1}).encode(), JSON),
    "inputs and instances": (b'{"inputs": [], "instances": []}', JSON),
    "a JSON list": (b"[1, 2, 3]", JSON),
    "dataframe_split": (b'{"dataframe_split": {"columns": ["a"], "data": [[1]]}}', JSON),
    "too many images": (image_body(np.zeros((51, 28, 28))), JSON),
    "over-long body": (b'{"inputs": "' + b"x" * (2 * 2**20) + b'"}', JSON),
}


@pytest.mark.parametrize("case", sorted(SERVE_HOSTILE))
def test_served_model_refuses_hostile_input_with_a_4xx(served, case):
    body, headers = SERVE_HOSTILE[case]
    status, answer = request(served.port, "POST", "/invocations", body, headers)
    assert_refusal(status, answer, case)


def test_served_model_still_answers_and_reads_several_digits(served, mnist_file):
    images, labels = zip(*(mnist_digit(mnist_file, index) for index in range(40)))
    for key in ("inputs", "instances"):
        status, answer = request(served.port, "POST", "/invocations", image_body(np.stack(images), key), JSON)
        assert status == 200
        predicted = np.argmax(json.loads(answer)["predictions"], axis=1)
        assert len(set(labels)) >= 8 and np.mean(predicted == np.array(labels)) >= 0.75  # a tiny model: ~90 %
    for path in ("/ping", "/health", "/version"):
        assert request(served.port, "GET", path)[0] == 200


def test_sixteen_concurrent_15_mib_bodies_stay_under_2_5_gib(store, mnist_file):
    server = start_serve(store)  # the default 16 MiB limit: 15 MiB bodies are read and parsed
    try:
        filler = b'{"inputs": ' + b" " * (15 * 2**20) + b"[]}"  # read whole, parsed, refused: no images
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: request(server.port, "POST", "/invocations", filler, JSON, timeout=120),
                                    range(16)))
        for status, body in answers:
            assert_refusal(status, body, "15 MiB body")
        assert server.peak() < 2.5 * 1024, server.peak_mib
        image, label = mnist_digit(mnist_file, 0)
        status, answer = request(server.port, "POST", "/invocations", image_body(image[None]), JSON)
        assert status == 200 and len(json.loads(answer)["predictions"][0]) == 10
    finally:
        server.stop()


def load(port: int, body: bytes, clients: int, seconds: float) -> tuple[int, list[str]]:
    """`clients` keep-alive clients posting `body` for `seconds`: requests answered 200, and failures."""
    answered, failures = [0], []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            try:
                connection.request("POST", "/invocations", body, JSON)
                response = connection.getresponse()
                data = response.read()
                with lock:
                    if response.status == 200 and len(json.loads(data)["predictions"]) == 1:
                        answered[0] += 1
                    else:
                        failures.append(f"{response.status} {data[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    failures.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answered[0], failures


def test_eight_clients_for_30_seconds_lose_no_request(served, mnist_file):
    image, _ = mnist_digit(mnist_file, 0)
    answered, failures = load(served.port, image_body(image[None]), clients=8, seconds=30)
    assert failures == [] and answered > 100


def test_sigterm_under_load_finishes_requests_in_flight_and_exits_within_10_s(store, mnist_file):
    server = start_serve(store)
    image, _ = mnist_digit(mnist_file, 0)
    body = image_body(np.repeat(image[None], 200, axis=0))  # requests that take a while
    results: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                results.append(request(server.port, "POST", "/invocations", body, JSON)[0])
            except OSError:  # refused once the server stopped listening: not a request in flight
                return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    answered_before = len(results)
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=15)
    exited_after = time.monotonic() - sent
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    server.stop()
    assert answered_before > 0
    assert exited_after < 10, exited_after
    assert set(results) == {200}, sorted(set(results))  # every request that got in was answered in full


# --- web page ----------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 12_000) -> bytes:
    """A 1-bit greyscale PNG of side x side pixels (144 Mpx), all zeros: about 100-150 kB of file."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def webp_vp8x_bomb() -> bytes:
    """An extended WebP header that declares a 16384x16384 canvas."""
    chunk = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def multipart(data: bytes, field: str = "image", filename: str = "digit.png") -> tuple[bytes, dict]:
    boundary = "hostileboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def data_url(data: bytes) -> tuple[bytes, dict]:
    return json.dumps({"image": "data:image/png;base64," + base64.b64encode(data).decode()}).encode(), JSON


def nan_tiff() -> bytes:
    values = np.full((32, 32), np.nan, dtype=np.float32)
    return encoded(Image.fromarray(values, mode="F"), "TIFF")


ONE = vertical_one()
WEB_HOSTILE = {
    "no content type": lambda: (encoded(ONE, "PNG"), {}),
    "wrong content type": lambda: (encoded(ONE, "PNG"), {"Content-Type": "image/png"}),
    "empty multipart": lambda: multipart(b""),
    "wrong field": lambda: multipart(encoded(ONE, "PNG"), field=MARKER),
    "text file": lambda: multipart(MARKER.encode() * 10, filename="notes.png"),
    "random bytes": lambda: multipart(bytes(np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8))),
    "truncated JPEG": lambda: multipart(encoded(ONE.convert("RGB"), "JPEG")[:300]),
    "truncated PNG": lambda: multipart(encoded(ONE, "PNG")[:60]),
    "PNG bomb": lambda: multipart(png_bomb()),
    "data-URL bomb": lambda: data_url(png_bomb()),
    "WebP canvas bomb": lambda: multipart(webp_vp8x_bomb(), filename="bomb.webp"),
    "NaN float TIFF": lambda: multipart(nan_tiff(), filename="nan.tiff"),
    "blank picture": lambda: multipart(encoded(Image.new("L", (64, 64), 255), "PNG")),
    "invalid base64": lambda: (json.dumps({"image": "data:image/png;base64,!!" + MARKER}).encode(), JSON),
    "not a data URL": lambda: (json.dumps({"image": MARKER}).encode(), JSON),
    "image not a string": lambda: (json.dumps({"image": [1, 2, 3]}).encode(), JSON),
    "JSON list": lambda: (b"[1, 2]", JSON),
    "invalid JSON": lambda: (b'{"image": ' + MARKER.encode(), JSON),
    "nested JSON": lambda: (b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON),
    "over-long body": lambda: multipart(b"\x00" * (6 * 2**20)),
}


@pytest.mark.parametrize("case", sorted(WEB_HOSTILE))
def test_web_refuses_hostile_input_with_a_4xx(web, case):
    body, headers = WEB_HOSTILE[case]()
    status, answer = request(web.port, "POST", "/api/predict", body, headers)
    assert_refusal(status, answer, case)


def test_web_reads_several_digits_after_hostile_input(web, mnist_file):
    correct = 0
    for index in range(30):
        pixels, label = mnist_digit(mnist_file, index)
        picture = Image.fromarray(255 - pixels).resize((140, 140))  # dark ink on white paper, as a photo
        status, answer = request(web.port, "POST", "/api/predict", *multipart(encoded(picture, "PNG")))
        assert status == 200
        correct += json.loads(answer)["label"] == label
    assert correct >= 22  # a tiny model on re-prepared MNIST digits: most of them


def test_eight_concurrent_png_bombs_leave_the_web_process_under_1_gib(web):
    body, headers = multipart(png_bomb())
    assert len(png_bomb()) < 200_000
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request(web.port, "POST", "/api/predict", body, headers), range(8)))
    for status, answer in answers:
        assert status in (400, 503), status  # refused, or every decode slot busy
        if status == 400:
            assert_refusal(status, answer, "PNG bomb")
    assert web.peak() < 1024, web.peak_mib
    assert request(web.port, "GET", "/healthz")[0] == 200


# --- early answers reach clients that write the whole body first ---------------------------------


def post_with_urllib(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:  # urllib sends "Connection: close" and the whole body before it reads
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", body, JSON),
                                    timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read()


def post_with_requests(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    import requests

    response = requests.post(f"http://127.0.0.1:{port}{path}", data=body, headers=JSON, timeout=60)
    return response.status_code, response.content


def post_from_a_raw_socket(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """Headers and the whole body written before a byte is read, keep-alive asked for."""
    import socket

    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(head + body)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, response.read()


CLIENTS = {"urllib": post_with_urllib, "requests": post_with_requests, "raw socket": post_from_a_raw_socket}


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize(("server", "path", "words"), [("served", "/invocations", "--max-body-mb"),
                                                       ("web", "/api/predict", "at most 5 MB")])
def test_an_over_limit_body_written_whole_before_reading_gets_its_413(request, client, server, path, words):
    running = request.getfixturevalue(server)
    running.reset_peak()
    before = running.peak_mib
    for size_mib in (17, 40):
        body = b"x" * (size_mib * 2**20)
        for _ in range(3):
            status, answer = CLIENTS[client](running.port, path, body)
            assert status == 413, (client, size_mib, status, answer[:200])
            assert_refusal(status, answer, f"{size_mib} MiB from {client}")
            assert words in answer.decode()
    assert running.peak() - before < 64, (before, running.peak_mib)  # the drained body is never kept
    assert request_answers(running)


def request_answers(running: Running) -> bool:
    """The server still answers on a new connection."""
    return running.answers("/ping" if "serve" in running.process.args else "/healthz")


@pytest.mark.parametrize(("server", "path", "words"), [("served", "/invocations", "--max-body-mb"),
                                                       ("web", "/api/predict", "at most 5 MB")])
def test_a_client_that_stalls_mid_body_is_closed_after_the_idle_bound(request, server, path, words):
    import socket

    from pipeline.serving.lingering import LINGER_IDLE_S

    running = request.getfixturevalue(server)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * 2**20}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as connection:
        connection.sendall(head + b"x" * 2**20)  # then nothing more, and the socket stays open
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert response.status == 413 and words in response.read().decode()
        answered = time.monotonic()
        assert connection.recv(65536) == b""  # the server closed: it does not wait for the 99 MiB
        assert time.monotonic() - answered < LINGER_IDLE_S + 3

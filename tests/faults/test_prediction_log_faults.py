"""The prediction log on a real PostgreSQL behind a proxy that we cut: record() never waits or raises,
lost rows are counted, and the writer comes back with the store."""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

from pipeline.monitoring import log as prediction_log
from pipeline.monitoring.log import PredictionLog, read_rows
from tests.code.test_prediction_log import entry
from tests.faults.conftest import CuttableProxy
from tests.serving.fixtures import mnist_file, register_model, tiny_model_path  # noqa: F401
from tests.serving.test_digit_verdict import Server


def through(proxy: CuttableProxy, url: str) -> str:
    server = urlsplit(url)
    return url.replace(server.netloc, f"{server.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")


def wait_until(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.postgres
def test_a_cut_store_costs_rows_not_requests_and_the_writer_comes_back(postgres_database, caplog, monkeypatch):
    monkeypatch.setattr(prediction_log, "RECONNECT_S", 0.2)
    url = postgres_database()
    server = urlsplit(url)
    proxy = CuttableProxy((server.hostname, server.port or 5432))
    log = PredictionLog(through(proxy, url), store_pixels=True, max_rows=10_000, queue_rows=1_000,
                        flush_s=0.05).start()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.log"):
            sent = 0
            for seed in range(10):
                log.record(entry(2, seed=seed))
                sent += 2
            assert log.flush(10) and log.written == 20 and log.stats()["store"] == "up"

            proxy.cut()
            slowest = 0.0
            for seed in range(50):  # about 2.5 s of traffic while the store is away
                started = time.perf_counter()
                log.record(entry(2, seed=seed))
                slowest = max(slowest, time.perf_counter() - started)
                sent += 2
                time.sleep(0.05)
            assert slowest < 0.05  # record() never waits on the store
            assert wait_until(lambda: log.stats()["store"] == "down")
            proxy.restore()

            assert wait_until(lambda: log.stats()["store"] == "up" and log._queued_rows == 0)
            for seed in range(5):
                log.record(entry(2, seed=100 + seed))
                sent += 2
            assert log.flush(10)
        stats = log.stats()
        assert stats["dropped"] > 0 and stats["written"] + stats["dropped"] == sent
        stored = read_rows(prediction_log.make_engine(url))  # straight to PostgreSQL, not through the proxy
        assert len(stored) == stats["written"]
        assert caplog.text.count("unreachable") == 1 and caplog.text.count("answers again") == 1
    finally:
        log.stop()
        proxy.cut()


# ---- the real server under load, its PostgreSQL log cut in the middle -------------------------------------


@pytest.fixture(scope="module")
def registered(tiny_model_path, mnist_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("log-load")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        register_model(tiny_model_path, "mnist-log-load", mnist_file, folder / "artifacts")
        yield uri


def load(port: int, pictures: list, seconds: float, clients: int = 8) -> list[int]:
    """`clients` threads posting one picture at a time for `seconds`; every status they got."""
    import http.client
    import threading

    statuses: list[int] = []
    stop = time.monotonic() + seconds
    body = json.dumps({"inputs": pictures}).encode()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@pytest.mark.slow
@pytest.mark.postgres
def test_eight_clients_lose_no_request_while_the_log_store_is_cut(registered, postgres_database, mnist_file, tmp_path):
    import threading

    url = postgres_database()
    server = urlsplit(url)
    proxy = CuttableProxy((server.hostname, server.port or 5432))
    with np.load(mnist_file) as data:
        picture = data["x_test"][:1].tolist()
    serve = Server("models:/mnist-log-load/1", registered, tmp_path / "serve.log", "--log-storage", through(proxy, url))
    try:
        assert load(serve.port, picture, 3.0)  # the store up: every answer is a row
        assert wait_until(lambda: health(serve.port)["queued"] == 0)
        time.sleep(0.5)
        before = health(serve.port)
        assert before["dropped"] == 0 and before["written"] == len(read_rows(prediction_log.make_engine(url)))

        # the cut in the middle of the traffic; MNIST_LOG_LOAD_S=30 runs the 30 s with a 10 s cut
        seconds = float(os.environ.get("MNIST_LOG_LOAD_S", "8"))
        cutter = threading.Timer(seconds / 3, proxy.cut)
        restorer = threading.Timer(seconds / 3 + seconds / 3, proxy.restore)
        cutter.start(), restorer.start()
        statuses = load(serve.port, picture, seconds)
        restorer.join()
        assert statuses and set(statuses) == {200}  # no request lost
        assert wait_until(lambda: health(serve.port)["store"] == "up" and health(serve.port)["queued"] == 0, 30)
        time.sleep(0.5)
        after = health(serve.port)
        answered = before["written"] + len(statuses)
        assert after["dropped"] > 0 and after["written"] + after["dropped"] == answered
        assert after["written"] == len(read_rows(prediction_log.make_engine(url)))  # the writer came back
        assert "rows are dropped and counted" in (tmp_path / "serve.log").read_text()
    finally:
        serve.stop()
        proxy.cut()


def health(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return json.load(response)["prediction_log"]

"""The prediction log on a real PostgreSQL behind a proxy that we cut: record() never waits or raises,
lost rows are counted, and the writer comes back with the store."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import pytest

from pipeline.monitoring import log as prediction_log
from pipeline.monitoring.log import PredictionLog, read_rows
from tests.code.test_prediction_log import entry
from tests.faults.conftest import CuttableProxy


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

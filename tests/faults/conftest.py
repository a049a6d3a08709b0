"""Real engines for the fault suite: a fresh PostgreSQL database per use, an MLflow server on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port

POSTGRES_ADMIN_URL = os.environ.get("MNIST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin_connection():
    import psycopg

    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture
def postgres_database():
    """Factory of new, empty databases; each call returns a SQLAlchemy URL (psycopg 3 driver).

    All are dropped afterwards. Skips with a reason when no server answers, except under CI where
    the server must be there.
    """
    import psycopg

    try:
        _admin_connection().close()
    except psycopg.OperationalError as error:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is required in CI: {error}")
        pytest.skip(f"no PostgreSQL server at {POSTGRES_ADMIN_URL} ({str(error).splitlines()[0]}); set MNIST_TEST_POSTGRES")
    created = []
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def create() -> str:
        name = f"mnist_test_{uuid.uuid4().hex[:12]}"
        with _admin_connection() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"{base}/{name}"

    yield create
    with _admin_connection() as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def mlflow_server(tmp_path):
    """Factory: `mlflow server` on a backend store URL with proxied artifacts in a local folder."""
    servers = []

    def start(backend_store_uri: str) -> str:
        port = free_port()
        log = (tmp_path / f"mlflow-server-{port}.log").open("w")
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT)
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        for _ in range(360):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    return url
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        pytest.fail(f"mlflow server did not start: {(tmp_path / f'mlflow-server-{port}.log').read_text()[-2000:]}")

    yield start
    for server in servers:
        server.terminate()
        server.wait(timeout=30)

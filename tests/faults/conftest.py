"""Real engines for the fault suite: a fresh PostgreSQL database per use, an MLflow server on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
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


def start_two_tuning_workers(project: Path, storage: str, tracking_uri: str, **knobs) -> tuple[subprocess.Popen, str, dict]:
    """`python -m pipeline tune --workers 2` in the copied `project`: 4 untuned-pruner trials of 3 epochs
    on 1,500 images with the study on `storage` and runs on `tracking_uri`, after fetch and preprocess;
    `knobs` (params.yaml keys) come on top. Returns (the launcher, its output on .stdout; the study
    name; the environment it runs in)."""
    from pipeline.core.config import load_params
    from pipeline.tuning.study import study_name
    from tests.e2e.conftest import project_env, run, tiny_params

    tiny_params(project / "params.yaml", **{
        "tune.storage": storage, "tune.n_trials": 4, "tune.epochs": 3, "tune.train_images": 1500,
        "tune.pruner": "none", **knobs})
    for stage in ("pipeline.fetch", "pipeline.preprocess"):
        run([sys.executable, "-m", stage], project)
    env = project_env(project) | {"MLFLOW_TRACKING_URI": tracking_uri}
    launcher = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--workers", "2"], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return launcher, study_name(load_params(project / "params.yaml")), env


class CuttableProxy:
    """A TCP forwarder from a loopback port to PostgreSQL. `cut()` closes the port and drops every
    connection through it (clients see refused and reset connections); `restore()` opens it again."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.connections: set[socket.socket] = set()
        self.guard = threading.Lock()
        self.open = threading.Event()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.open.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.open.clear()
        time.sleep(0.3)  # the accept loop closes its port
        with self.guard:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self.open.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
                client.settimeout(None)
                with self.guard:
                    self.connections |= {client, upstream}
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

"""`serve` and `web` follow the champion alias: a promotion, a rollback and a tampered version,
each while requests stream in."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.serving.fixtures import mnist_file, register_model, tiny_model_path  # noqa: F401
from tests.serving.test_digit_verdict import Server

NAME = "mnist-follow-test"
CHAMPION = f"models:/{NAME}@champion"
REFRESH_S = 0.3


@pytest.fixture(scope="module")
def store(tiny_model_path, mnist_file, tmp_path_factory):
    """Three versions of the tiny model; v3's ONNX file is changed after registration."""
    folder = tmp_path_factory.mktemp("follow-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        for index in (1, 2, 3):
            register_model(tiny_model_path, NAME, mnist_file, folder / f"artifacts-{index}", verdict=index != 2)
        [onnx] = (folder / "artifacts-3").rglob("model.onnx")
        onnx.write_bytes(onnx.read_bytes() + b"\0")
        yield {"uri": uri}


def set_champion(store_uri: str, version: str, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)


class Stream:
    """A client thread posting one image after another, recording (status, X-Model-Version)."""

    def __init__(self, port: int, image: list) -> None:
        self.body = json.dumps({"inputs": [image]}).encode()
        self.url = f"http://127.0.0.1:{port}/invocations"
        self.seen: list[tuple[int, str | None]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            request = urllib.request.Request(self.url, self.body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    self.seen.append((response.status, response.headers.get("X-Model-Version")))
            except urllib.error.HTTPError as error:
                self.seen.append((error.code, None))

    def wait_for(self, version: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.seen and self.seen[-1][1] == version):
            assert time.monotonic() < deadline, f"never answered with version {version}: {self.seen[-5:]}"
            time.sleep(0.05)

    def stop(self) -> list[tuple[int, str | None]]:
        self.stopping.set()
        self.thread.join(timeout=15)
        return self.seen


def segments(seen: list[tuple[int, str | None]]) -> list[str]:
    """The versions that answered, in order, each run of one version once."""
    runs: list[str] = []
    for _, version in seen:
        if not runs or runs[-1] != version:
            runs.append(version)
    return runs


def test_serve_follows_promotion_and_rollback_and_refuses_a_tampered_version(store, mnist_file, tmp_path, monkeypatch):
    with np.load(mnist_file) as data:
        image = data["x_test"][0].tolist()
    set_champion(store["uri"], "1", monkeypatch)
    server = Server(CHAMPION, store["uri"], tmp_path / "serve.log", "--refresh-s", str(REFRESH_S))
    stream = Stream(server.port, image)
    try:
        stream.wait_for("1")
        set_champion(store["uri"], "2", monkeypatch)  # promote
        stream.wait_for("2")
        set_champion(store["uri"], "1", monkeypatch)  # roll back
        stream.wait_for("1")
        set_champion(store["uri"], "3", monkeypatch)  # a version whose model file changed
        time.sleep(6 * REFRESH_S)
        during = len(stream.seen)
        time.sleep(4 * REFRESH_S)
    finally:
        seen = stream.stop()
        server.stop()
    assert {status for status, _ in seen} == {200}, "no request failed during the switches"
    assert segments(seen) == ["1", "2", "1"], segments(seen)
    assert len(seen) > during  # still answering after the refusal, from version 1
    log = (tmp_path / "serve.log").read_text()
    assert log.count("moved to version 3, which is refused") == 1, log
    assert "now serving version 2 (was 1)" in log and "now serving version 1 (was 2)" in log


def test_web_follows_the_alias_and_names_the_version(store, mnist_file, monkeypatch):
    from PIL import Image

    from pipeline.serving.web import create_app

    set_champion(store["uri"], "1", monkeypatch)
    client = create_app(CHAMPION, refresh_s=REFRESH_S).test_client()
    with np.load(mnist_file) as data:
        picture = Image.fromarray(255 - data["x_test"][0]).resize((140, 140))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")

    def version() -> str:
        response = client.post("/api/predict", data={"image": (io.BytesIO(buffer.getvalue()), "seven.png")})
        assert response.status_code == 200
        return response.get_json()["model_version"]

    assert version() == "1"
    set_champion(store["uri"], "2", monkeypatch)
    deadline = time.monotonic() + 20
    while version() != "2":
        assert time.monotonic() < deadline, "web never switched to version 2"
        time.sleep(0.1)
    assert client.get("/healthz").get_json()["version"] == "2"
    client.application.extensions["mnist_model"].get().stop()

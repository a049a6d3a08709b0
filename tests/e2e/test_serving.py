"""The champion served by the real `mlflow models serve` process, called over HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import project_env

pytestmark = pytest.mark.slow


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def served_champion(tiny_project):
    port = free_port()
    env = project_env(tiny_project) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlruns' / 'mlflow.db'}"}
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/mnist-cnn@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tiny_project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"mlflow models serve exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer /ping")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_invocations_return_ten_probabilities_per_image(served_champion, mnist_npz):
    with np.load(mnist_npz) as data:
        images, labels = data["x_test"][:20], data["y_test"][:20]
    body = json.dumps({"inputs": images.reshape(-1, 28, 28, 1).astype(np.float64).tolist()}).encode()
    status, answer = post(f"{served_champion}/invocations", body)
    assert status == 200, answer
    probabilities = np.asarray(answer["predictions"])
    assert probabilities.shape == (20, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.5


def test_instances_format_and_integers_are_accepted(served_champion):
    body = json.dumps({"instances": np.zeros((2, 28, 28, 1), dtype=int).tolist()}).encode()
    status, answer = post(f"{served_champion}/invocations", body)
    assert status == 200 and np.asarray(answer["predictions"]).shape == (2, 10)


@pytest.mark.parametrize(
    "body",
    [b"{not json", json.dumps({"inputs": [[1, 2, 3]]}).encode(), json.dumps({"wrong_key": []}).encode(), b"",
     json.dumps({"inputs": [[["a"] * 28] * 28]}).encode()],
    ids=["malformed-json", "wrong-shape", "unknown-field", "empty", "wrong-dtype"],
)
def test_bad_requests_get_4xx_with_a_message_and_server_keeps_serving(served_champion, body):
    status, answer = post(f"{served_champion}/invocations", body)
    assert 400 <= status < 500, (status, answer)
    assert answer.get("message")
    with urllib.request.urlopen(f"{served_champion}/ping", timeout=5) as response:
        assert response.status == 200

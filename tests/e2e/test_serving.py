"""The champion served by the real `mlflow models serve` and `python -m pipeline serve` processes, over loopback."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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


def wait_for_ping(base: str, server: subprocess.Popen, log: Path) -> None:
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                return
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"{server.args} exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    pytest.fail(f"{server.args} did not answer /ping: {log.read_text()[-2000:]}")


@contextmanager
def running(command: list[str], project: Path, log: Path, env: dict[str, str]):
    """The server `command` (ending in --port) started in the project; yields its base URL."""
    port = free_port()
    with log.open("w") as stream:
        server = subprocess.Popen([*command, str(port)], cwd=project, env=env, stdout=stream, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(base, server, log)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_served(tiny_project, tmp_path_factory):
    env = project_env(tiny_project) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlruns' / 'mlflow.db'}"}
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", "models:/mnist-cnn@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "--workers", "1", "--port"]
    with running(command, tiny_project, tmp_path_factory.mktemp("serve") / "mlflow.log", env) as base:
        yield base


@pytest.fixture(scope="module")
def pipeline_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "pipeline.log"


@pytest.fixture(scope="module")
def pipeline_served(tiny_project, pipeline_log):
    """`python -m pipeline serve` with its defaults (the project's store, the champion) and a 1 MiB limit."""
    command = [sys.executable, "-m", "pipeline", "serve", "--max-body-mb", "1", "--port"]
    with running(command, tiny_project, pipeline_log, project_env(tiny_project)) as base:
        yield base


@pytest.fixture(params=["mlflow models serve", "python -m pipeline serve"])
def served_champion(request):
    """The champion behind either server: both answer MLflow's scoring protocol alike."""
    return request.getfixturevalue("mlflow_served" if request.param.startswith("mlflow") else "pipeline_served")


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


def test_the_readme_curl_example_runs_as_written(pipeline_served, tiny_project, mnist_npz):
    """The README's request, copied from it: a real test digit (docs/sample_request.json) gets ten
    probabilities."""
    import re
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    readme = (tiny_project / "README.md").read_text()
    (command,) = re.findall(r"^curl -s localhost:5001/invocations .*$", readme, flags=re.MULTILINE)
    command = command.replace("localhost:5001", pipeline_served.removeprefix("http://"))
    result = subprocess.run(command, shell=True, cwd=tiny_project, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    probabilities = np.asarray(json.loads(result.stdout)["predictions"])
    assert probabilities.shape == (1, 10)
    sample = json.loads((tiny_project / "docs" / "sample_request.json").read_text())
    with np.load(mnist_npz) as data:  # the sample is the first test digit, a 7
        assert np.array_equal(np.asarray(sample["inputs"]).reshape(28, 28), data["x_test"][0]) and data["y_test"][0] == 7


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


# --- python -m pipeline serve: the request-size limit ----------------------------------------

MIB = 1024 * 1024


def images_json(count: int) -> bytes:
    return json.dumps({"inputs": np.zeros((count, 28, 28, 1)).tolist()}).encode()


def post_chunked(base: str, chunks: Iterator[bytes]) -> tuple[int, dict]:
    """POST with Transfer-Encoding: chunked (no Content-Length), as streaming clients send."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.request("POST", "/invocations", body=chunks, headers={"Content-Type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def assert_still_serving(base: str) -> None:
    with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
        assert response.status == 200
    status, answer = post(f"{base}/invocations", images_json(3))
    assert status == 200 and np.asarray(answer["predictions"]).shape == (3, 10)


def test_pipeline_serve_logs_its_url_and_limit(pipeline_served, pipeline_log):
    assert f"{pipeline_served}/invocations; bodies over 1 MiB get 413" in pipeline_log.read_text()


def post_expecting_continue(base: str, length: int) -> tuple[int, dict]:
    """Headers first, with `Expect: 100-continue`, as curl sends a large body: the body would follow a
    100 only, so a 413 here shows the server refused the request without reading it. (A client that
    sends the whole body regardless may find the connection closed under it: a broken pipe.)"""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest("POST", "/invocations")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(length)),
                            ("Expect", "100-continue")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()  # a 100 would be skipped, then time out waiting for the body
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_declared_over_the_limit_gets_413_and_the_server_keeps_serving(pipeline_served):
    length = len(images_json(400))
    assert length > MIB
    status, answer = post_expecting_continue(pipeline_served, length)
    assert status == 413, answer
    assert answer["error_code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert "1 MiB" in answer["message"] and "--max-body-mb" in answer["message"]
    assert_still_serving(pipeline_served)


def test_a_chunked_body_streaming_past_the_limit_gets_413_and_the_server_keeps_serving(pipeline_served):
    body = images_json(400)[: MIB + 64 * 1024]  # just past the limit: little is left to send after the 413
    status, answer = post_chunked(pipeline_served, (body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)))
    assert status == 413, answer
    assert answer["error_code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert_still_serving(pipeline_served)


def test_a_chunked_body_within_the_limit_is_predicted(pipeline_served):
    body = images_json(5)
    status, answer = post_chunked(pipeline_served, (body[i : i + 1000] for i in range(0, len(body), 1000)))
    assert status == 200 and np.asarray(answer["predictions"]).shape == (5, 10)

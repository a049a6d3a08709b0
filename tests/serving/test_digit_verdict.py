"""The digit verdict, as users meet it: registered with a version, loaded under its hash, and the
same answer from `predict`, `web` and `serve`; an older version without one still serves."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import nondigits
from pipeline.core.errors import PipelineError
from pipeline.serving.images import ImageError, prepare_image, read_image
from tests.conftest import free_port
from tests.serving.fixtures import REPO, mnist_file, register_model, tiny_model_path  # noqa: F401

NAME = "mnist-verdict-test"
WITH_VERDICT, WITHOUT_VERDICT = f"models:/{NAME}/1", f"models:/{NAME}/2"


@pytest.fixture(scope="module")
def store(tiny_model_path, mnist_file, tmp_path_factory):
    """A SQLite MLflow store with the tiny model registered twice: v1 with its digit verdict, v2 as
    a version registered before verdicts existed."""
    folder = tmp_path_factory.mktemp("verdict-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        register_model(tiny_model_path, NAME, mnist_file, folder / "artifacts-1")
        register_model(tiny_model_path, NAME, mnist_file, folder / "artifacts-2", verdict=False)
        yield {"uri": uri, "folder": folder}


@pytest.fixture
def tracking(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return store


def mixed_pictures(mnist: Path, folder: Path) -> list[Path]:
    """50 picture files: 25 MNIST test digits as users' pictures (dark on light, enlarged) and 25
    heldout non-digits (letters and symbols, doodles, noise, clothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(mnist) as data:
        digits = data["x_test"][100:125]
    kinds = [nondigits.generate(kind, 7, seed=3, split="heldout") for kind in nondigits.KINDS]
    others = np.concatenate(kinds)[:25]
    paths = []
    for index, pixels in enumerate(np.concatenate([255 - digits, others])):
        path = folder / f"{index:02d}.png"
        Image.fromarray(pixels.astype(np.uint8)).resize((140, 140), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


READY_PATHS = {"serve": "/ping", "web": "/healthz"}


class Server:
    """`python -m pipeline serve` (or `web`) on a free loopback port, against the test store."""

    def __init__(self, model: str, store_uri: str, log: Path, *options: str, command: str = "serve") -> None:
        self.port = free_port()
        if "--no-log" not in options and "--log-storage" not in options:  # never into the checkout's monitoring/
            options = (*options, "--log-storage", f"sqlite:///{log.parent / 'predictions.db'}")
        env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop("MLFLOW_REGISTRY_URI", None)  # a registry another test left in the environment is not this store
        with open(log, "w") as stream:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline", command, "--model", model,
                                             "--port", str(self.port), *options], cwd=REPO, env=env, stdout=stream,
                                            stderr=subprocess.STDOUT)
        self.log = log
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}{READY_PATHS[command]}", timeout=2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"{command} did not start:\n{log.read_text()}")
                time.sleep(0.2)

    def invoke(self, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def predict_json(capsys, model: str, paths: list[Path]) -> list[dict]:
    from pipeline.commands.predict import main

    main(["--json", "--model", model, *map(str, paths)])
    return json.loads(capsys.readouterr().out)


def web_answers(model: str, paths: list[Path]) -> list[tuple[int, dict]]:
    from pipeline.serving.web import create_app

    client = create_app(model).test_client()
    answers = []
    for path in paths:
        response = client.post("/api/predict", data={"image": (io.BytesIO(path.read_bytes()), path.name)})
        answers.append((response.status_code, response.get_json()))
    return answers


def test_predict_web_and_serve_give_the_same_verdict_on_50_mixed_pictures(tracking, mnist_file, tmp_path, capsys):
    paths = mixed_pictures(mnist_file, tmp_path / "pictures")
    from_predict = predict_json(capsys, WITH_VERDICT, paths)
    from_web = web_answers(WITH_VERDICT, paths)
    prepared, rows = [], []
    for index, path in enumerate(paths):
        try:
            prepared.append(prepare_image(read_image(path)))
            rows.append(index)
        except ImageError:  # a flat picture: both file interfaces answer it with an error
            assert "error" in from_predict[index] and from_web[index][0] == 400
    assert len(rows) >= 45
    server = Server(WITH_VERDICT, tracking["uri"], tmp_path / "serve.log")
    try:
        status, served = server.invoke({"inputs": np.stack(prepared).tolist()})
    finally:
        server.stop()
    assert status == 200 and len(served["is_digit"]) == len(rows)
    for row, index in enumerate(rows):
        cli, (status, web) = from_predict[index], from_web[index]
        assert status == 200
        assert cli["is_digit"] == web["is_digit"] == served["is_digit"][row], paths[index]
        assert cli["label"] == web["label"] == int(np.argmax(served["predictions"][row]))
        assert cli["digit_score"] == web["digit_score"]
    verdicts = [from_predict[index]["is_digit"] for index in rows]
    digits = [verdict for index, verdict in zip(rows, verdicts) if index < 25]
    others = [verdict for index, verdict in zip(rows, verdicts) if index >= 25]
    assert sum(digits) >= 23, digits  # the threshold accepts 99.5 % of validation digits
    assert sum(not verdict for verdict in others) >= 10, others  # a real split, not one answer for all


def test_serve_leaves_is_digit_out_when_the_request_asks(tracking, mnist_file, tmp_path):
    with np.load(mnist_file) as data:
        image = data["x_test"][:1].tolist()
    server = Server(WITH_VERDICT, tracking["uri"], tmp_path / "serve.log")
    try:
        with_key = server.invoke({"inputs": image})
        without = server.invoke({"inputs": image, "params": {"digit_verdict": False}})
        wrong = server.invoke({"inputs": image, "params": {"digit_verdict": "no"}})
    finally:
        server.stop()
    assert with_key[0] == 200 and with_key[1]["is_digit"] == [True]
    assert without[0] == 200 and without[1]["predictions"] == with_key[1]["predictions"]  # MLflow's answer ...
    assert set(without[1]) == {"predictions", "prediction_ids"}  # ... and the log's ids, for feedback
    assert wrong[0] == 400 and "params.digit_verdict must be true or false" in wrong[1]["message"]


def test_a_version_registered_before_verdicts_serves_without_is_digit(tracking, mnist_file, tmp_path, capsys, caplog):
    from pipeline.serving.classifier import load_classifier
    from pipeline.serving.served import NO_VERDICT_NOTE

    with caplog.at_level(logging.WARNING, logger="pipeline.serving.classifier"):
        model = load_classifier(WITHOUT_VERDICT)
    assert not model.has_verdict
    notes = [record.getMessage() for record in caplog.records if NO_VERDICT_NOTE in record.getMessage()]
    assert len(notes) == 1 and "dvc repro -f evaluate" in notes[0]

    paths = mixed_pictures(mnist_file, tmp_path / "pictures")[:2]
    cli = predict_json(capsys, WITHOUT_VERDICT, paths)
    assert all("is_digit" not in row and row["label"] in range(10) for row in cli)
    status, web = web_answers(WITHOUT_VERDICT, paths[:1])[0]
    assert status == 200 and "is_digit" not in web and web["digit_check"] == NO_VERDICT_NOTE
    server = Server(WITHOUT_VERDICT, tracking["uri"], tmp_path / "serve.log")
    try:
        status, served = server.invoke({"inputs": [prepare_image(read_image(paths[0])).tolist()]})
    finally:
        server.stop()
    assert status == 200 and set(served) == {"predictions", "prediction_ids"}
    assert NO_VERDICT_NOTE in (tmp_path / "serve.log").read_text()


def test_a_verdict_file_changed_after_registration_is_refused(tiny_model_path, mnist_file, tmp_path, monkeypatch):
    from pipeline.serving.classifier import load_classifier

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    register_model(tiny_model_path, NAME, mnist_file, tmp_path / "artifacts")
    assert load_classifier(WITH_VERDICT).has_verdict
    [stored] = (tmp_path / "artifacts").rglob("digit_verdict.npz")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="digit verdict .* does not match its registered sha256"):
        load_classifier(WITH_VERDICT)


def canvas(pixels: list[tuple[int, int]]) -> bytes:
    image = Image.new("RGB", (280, 280), "black")
    for point in pixels:
        image.putpixel(point, (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_blank_and_a_one_pixel_canvas_get_a_clear_answer(tracking):
    from pipeline.serving.web import create_app

    client = create_app(WITH_VERDICT).test_client()
    blank = client.post("/api/predict", data={"image": (io.BytesIO(canvas([])), "blank.png")})
    assert blank.status_code == 400 and "no digit found" in blank.get_json()["error"]
    pixel = client.post("/api/predict", data={"image": (io.BytesIO(canvas([(140, 140)])), "pixel.png")})
    assert pixel.status_code == 400 and "no digit found" in pixel.get_json()["error"]
    square = [(x, y) for x in range(100, 180) for y in range(100, 180)]  # a filled square: no digit has its ink
    blob = client.post("/api/predict", data={"image": (io.BytesIO(canvas(square)), "blob.png")})
    body = blob.get_json()
    assert blob.status_code == 200 and body["is_digit"] is False, body


def test_the_threshold_comes_from_validation_never_from_test(tiny_model_path, mnist_file, tmp_path):
    """The whole fit (`ood.fit_and_report`, what evaluate runs) twice, the second time with other
    test digits: the same verdict file, byte for byte."""
    import keras

    from pipeline.core import evaluation, ood
    from pipeline.core.export import classifier_head, export_onnx
    from pipeline.serving.classifier import OnnxClassifier
    from tests.serving.fixtures import VERDICT_SETTINGS

    model = keras.saving.load_model(tiny_model_path)
    onnx = OnnxClassifier(export_onnx(model, tmp_path / "model.onnx"))
    with np.load(mnist_file) as data:
        train = data["x_train"][:2000], data["y_train"][:2000]
        validation, test = data["x_train"][-2000:], data["x_test"]
    head = classifier_head(model).get_weights()
    files = []
    for index, test_pixels in enumerate((test[:1000], 255 - test[5000:6000])):
        state, report = ood.fit_and_report(onnx.outputs, head, VERDICT_SETTINGS, 0, train, validation,
                                           test_pixels, (test_pixels[:10], 10))
        files.append(tmp_path / f"verdict-{index}.npz")
        evaluation.save_verdict(files[-1], state)
        assert report["accepted"]["validation_digits"] >= 0.995
    assert files[0].read_bytes() == files[1].read_bytes()
    assert report["accepted"]["test_digits"] < 0.5  # inverted digits: the changed test data was scored


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_says_plainly_when_a_picture_is_not_a_digit(store, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.serving.test_web import browser_or_skip, start_browser

    browser_or_skip()
    square = tmp_path / "square.png"  # a filled square: rejected by any verdict (the tiny model's may pass a star)
    Image.open(io.BytesIO(canvas([(x, y) for x in range(100, 180) for y in range(100, 180)]))).save(square)
    web = Server(WITH_VERDICT, store["uri"], tmp_path / "web.log", command="web")
    driver = start_browser()
    try:
        driver.get(f"http://127.0.0.1:{web.port}")
        driver.find_element("id", "file").send_keys(str(square))
        WebDriverWait(driver, 30).until(lambda d: d.find_element("id", "verdict").is_displayed())
        assert driver.find_element("id", "verdict").text == "This does not look like a digit."
        assert "closest" in driver.find_element("id", "label").get_attribute("class")
        assert driver.find_element("id", "confidence").text.startswith("closest guess: ")
        driver.save_screenshot(os.environ.get("WEB_VERDICT_SCREENSHOT", "/tmp/web-not-a-digit.png"))
    finally:
        driver.quit()
        web.stop()


def test_serve_answers_each_status_with_mlflows_error_code(tracking, tmp_path):
    from mlflow.protos import databricks_pb2

    server = Server(WITH_VERDICT, tracking["uri"], tmp_path / "serve.log")

    def call(method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", body, {"Content-Type": content_type},
                                         method=method)
        try:
            urllib.request.urlopen(request, timeout=10).close()
            return 200, None
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)["error_code"]

    try:
        answers = [call("GET", "/nope"), call("GET", "/invocations"), call("POST", "/invocations", b"{}", "text/plain"),
                   call("POST", "/invocations", b"{not json")]
    finally:
        server.stop()
    assert answers == [(404, "ENDPOINT_NOT_FOUND"), (405, "ENDPOINT_NOT_FOUND"), (415, "BAD_REQUEST"),
                       (400, "BAD_REQUEST")]
    assert all(databricks_pb2.ErrorCode.Value(code) for _, code in answers)  # codes an MLflow client knows

"""`serve` and `web` as the prediction log's writers: every answer a row, ids in the answers, feedback
validated, the log's health reported, and --no-log leaving no trace."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.monitoring.log import NOT_A_DIGIT, PredictionLog, make_engine, read_rows
from tests.serving.fixtures import mnist_file, reference_split, register_model, tiny_model_path  # noqa: F401
from tests.serving.test_digit_verdict import Server

NAME = "mnist-log-test"
MODEL = f"models:/{NAME}/1"


@pytest.fixture(scope="module")
def store(tiny_model_path, mnist_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("log-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        register_model(tiny_model_path, NAME, mnist_file, folder / "artifacts")
        yield {"uri": uri, "folder": folder}


@pytest.fixture(scope="module")
def digits(mnist_file):
    with np.load(mnist_file) as data:
        return data["x_test"][:12], data["y_test"][:12]


def post(port: int, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


def feedback(port: int, payload) -> tuple[int, dict]:
    return post(port, "/feedback", json.dumps(payload).encode())


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-log")
    database = folder / "predictions.db"
    server = Server(MODEL, store["uri"], folder / "serve.log", "--log-storage", f"sqlite:///{database}")
    yield server, database
    server.stop()


def test_serve_logs_every_answered_picture_and_names_each_in_the_answer(served, digits):
    server, database = served
    x, y = digits
    answers = [server.invoke({"inputs": x[start:start + 4].tolist()}) for start in (0, 4, 8)]
    assert all(status == 200 for status, _ in answers)
    ids = [picture for _, body in answers for picture in body["prediction_ids"]]
    assert len(ids) == len(set(ids)) == 12
    assert [len(body["prediction_ids"]) for _, body in answers] == [len(body["predictions"]) for _, body in answers]
    labels = [int(np.argmax(row)) for _, body in answers for row in body["predictions"]]
    deadline_rows = wait_for_rows(database, ids)
    by_id = deadline_rows.set_index("id")
    assert [int(by_id.loc[picture, "label"]) for picture in ids] == labels
    assert set(by_id["interface"]) == {"serve"} and set(by_id["version"]) == {"1"} and set(by_id["model"]) == {MODEL}
    stored = np.frombuffer(by_id.loc[ids[5], "pixels"], np.uint8).reshape(28, 28)
    assert np.array_equal(stored, x[5])
    assert (by_id["latency_ms"] > 0).all()
    health = get(server.port, "/health")
    assert health["model_version"] == "1"
    assert health["prediction_log"]["written"] >= 12 and health["prediction_log"]["dropped"] == 0


def wait_for_rows(database, ids, timeout_s: float = 10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        rows = read_rows(make_engine(f"sqlite:///{database}"))
        if set(ids) <= set(rows["id"]) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_feedback_is_stored_and_a_second_answer_replaces_the_first(served, digits):
    server, database = served
    x, y = digits
    status, body = server.invoke({"inputs": x[:2].tolist()})
    first, second = body["prediction_ids"]
    assert feedback(server.port, {"id": first, "label": int(y[0])}) == (200, {"id": first, "label": int(y[0])})
    assert feedback(server.port, {"id": second, "label": "3"})[0] == 200
    assert feedback(server.port, {"id": second, "label": "not-digit"}) == (200, {"id": second, "label": "not-digit"})
    rows = read_rows(make_engine(f"sqlite:///{database}")).set_index("id")
    assert rows.loc[first, "feedback"] == y[0] and rows.loc[second, "feedback"] == NOT_A_DIGIT


@pytest.mark.parametrize("body, content_type, status, phrase", [
    (b'{"id": "%s-0", "label": 1}' % (b"0" * 32), "application/json", 404, "no logged prediction has this id"),
    (b'{"id": "abc", "label": 1}', "application/json", 400, '"id" is not a prediction id'),
    (b'{"id": "%s-0", "label": 12}' % (b"0" * 32), "application/json", 400, '"label" must be a digit 0-9 or "not-digit"'),
    (b'{"id": "%s-0"}' % (b"0" * 32), "application/json", 400, "exactly the keys id and label"),
    (b'[1, 2]', "application/json", 400, "exactly the keys id and label"),
    (b'{"id": ', "application/json", 400, "not valid JSON"),
    (b'{"id": "x", "label": 1}', "text/plain", 415, "content type 'text/plain' is not supported"),
    (b'{"id": "%s"}' % (b"x" * 2000), "application/json", 413, "at most 1024 bytes"),
])
def test_bad_feedback_gets_a_4xx_with_one_line(served, body, content_type, status, phrase):
    server, _ = served
    answered, error = post(server.port, "/feedback", body, content_type)
    assert answered == status and phrase in error["message"] and "\n" not in error["message"]
    assert error["error_code"] in ("BAD_REQUEST", "ENDPOINT_NOT_FOUND", "RESOURCE_LIMIT_EXCEEDED")


def test_no_log_means_no_ids_no_rows_and_no_feedback(store, digits, tmp_path):
    database = tmp_path / "predictions.db"
    server = Server(MODEL, store["uri"], tmp_path / "serve.log", "--no-log")
    try:
        status, body = server.invoke({"inputs": digits[0][:2].tolist()})
        refused = feedback(server.port, {"id": f"{'0' * 32}-0", "label": 1})
        health = get(server.port, "/health")
    finally:
        server.stop()
    assert status == 200 and set(body) == {"predictions", "is_digit"}
    assert refused[0] == 503 and "--no-log" in refused[1]["message"]
    assert health["prediction_log"] == {"enabled": False, "reason": "--no-log"}
    assert not database.exists()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(255 - pixels).resize((140, 140)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_web_logs_each_picture_and_takes_feedback_for_it(store, digits, tmp_path, monkeypatch):
    from pipeline.serving.web import create_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    log = PredictionLog(f"sqlite:///{tmp_path / 'scratch' / 'predictions.db'}", store_pixels=True, max_rows=100,
                        queue_rows=100, flush_s=0.05).start()
    try:
        client = create_app(MODEL, prediction_log=log).test_client()
        x, y = digits
        answer = client.post("/api/predict", data={"image": (io.BytesIO(png(x[3])), "three.png")}).get_json()
        assert answer["label"] == y[3] and answer["model_version"] == "1"
        given = client.post("/feedback", json={"id": answer["prediction_id"], "label": 8})
        assert given.status_code == 200 and given.get_json() == {"id": answer["prediction_id"], "label": 8}
        assert client.post("/feedback", json={"id": answer["prediction_id"], "label": "eight"}).status_code == 400
        assert client.post("/feedback", data="x" * 2000, content_type="application/json").status_code == 413
        missing = client.post("/feedback", json={"id": f"{'f' * 32}-0", "label": 1})
        assert missing.status_code == 404 and "prediction_id" in missing.get_json()["error"]
        rows = read_rows(log._connect())
        assert len(rows) == 1 and rows["interface"][0] == "web" and rows["feedback"][0] == 8
        assert client.get("/healthz").get_json()["prediction_log"]["written"] == 1
    finally:
        log.stop()


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_asks_wrong_and_stores_the_users_answer(store, digits, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.serving.test_web import browser_or_skip, start_browser

    browser_or_skip()
    x, y = digits
    picture = tmp_path / "digit.png"
    picture.write_bytes(png(x[0]))
    database = tmp_path / "predictions.db"
    web = Server(MODEL, store["uri"], tmp_path / "web.log", "--log-storage", f"sqlite:///{database}", command="web")
    driver = start_browser()
    try:
        driver.get(f"http://127.0.0.1:{web.port}")
        assert not driver.find_element("id", "feedback").is_displayed()  # nothing to correct yet
        driver.find_element("id", "file").send_keys(str(picture))
        WebDriverWait(driver, 30).until(lambda d: d.find_element("id", "feedback").is_displayed())
        assert driver.find_element("css selector", "#feedback .ask").text == "Wrong? It is a …"
        driver.find_element("css selector", '#feedback .choice[data-label="not-digit"]').click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element("id", "thanks").is_displayed())
        driver.find_element("css selector", '#feedback .choice[data-label="4"]').click()  # changes the answer
        WebDriverWait(driver, 10).until(lambda d: "noted as 4" in d.find_element("id", "thanks").text)
        driver.save_screenshot(os.environ.get("WEB_FEEDBACK_SCREENSHOT", "/tmp/web-feedback.png"))
    finally:
        driver.quit()
        web.stop()
    rows = read_rows(make_engine(f"sqlite:///{database}"))
    assert len(rows) == 1 and rows["feedback"][0] == 4 and rows["label"][0] == y[0]


def run_monitor(capsys, *argv: str) -> tuple[int, str, dict]:
    from pipeline.commands.monitor import main

    try:
        status = main(list(argv))
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    drift = Path("monitoring/drift.json")
    return status, out.out + out.err, json.loads(drift.read_text()) if drift.is_file() else {}


def test_monitor_passes_normal_traffic_and_fails_thick_strokes_naming_the_feature(store, mnist_file, tmp_path,
                                                                                    monkeypatch, capsys):
    from scipy.ndimage import grey_dilation

    from tests.serving.fixtures import REPO

    project = tmp_path / "project"  # monitor writes monitoring/ where it runs: a scratch project, not the checkout
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    database = project / "monitoring" / "predictions.db"
    with np.load(mnist_file) as data:  # drawn over the whole test set: its halves come from different writers
        drawn = data["x_test"][np.random.default_rng(0).permutation(len(data["x_test"]))[:600]]
    normal, thick = drawn[:300], grey_dilation(drawn[300:], size=(1, 3, 3))
    server = Server(MODEL, store["uri"], tmp_path / "serve.log", "--log-storage", f"sqlite:///{database}")
    try:
        assert server.invoke({"inputs": normal.tolist()})[0] == 200
        time.sleep(1.0)  # the writer's batch lands
        calm = run_monitor(capsys, "--model", MODEL, "--last", "300")
        assert server.invoke({"inputs": thick.tolist()})[0] == 200
        time.sleep(1.0)
        drifted = run_monitor(capsys, "--model", MODEL, "--last", "300")
        too_few = run_monitor(capsys, "--model", MODEL, "--last", "50")
    finally:
        server.stop()
    status, out, report = calm
    assert status == 0 and report["status"] == "ok" and report["n_window"] == 300, out
    status, out, report = drifted
    assert status == 1 and report["status"] == "drift", out
    assert "feature:ink_fraction" in report["failed"] and "drift: feature:ink_fraction" in out
    html = (project / "monitoring" / "report.html").read_text()
    assert "ink_fraction" in html and "http://" not in html and "https://" not in html
    status, out, report = too_few
    assert status == 0 and report["status"] == "too_few" and "no verdict" in out

    import mlflow

    runs = mlflow.search_runs(experiment_names=["mnist-monitoring"], order_by=["start_time ASC"])
    assert list(runs["tags.status"])[-3:] == ["ok", "drift", "too_few"]
    assert set(runs["tags.model_version"]) == {"1"}


def test_monitor_refuses_usage_and_store_errors_in_one_line(store, tmp_path, monkeypatch, capsys):
    from tests.serving.fixtures import REPO

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    cases = [(["--since", "yesterday"], "is not a duration"),
             (["--since", "1h", "--last", "5"], "not allowed with argument"),
             (["--model", MODEL, "--out", "../elsewhere"], "is outside the working folder"),
             (["--model", MODEL, "--log-storage", "mysql://x@h/db"], "must be a SQLite URL"),
             (["--model", MODEL, "--log-storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"], "unreachable"),
             (["--model", f"models:/{NAME}/99"], "")]
    for argv, phrase in cases:
        status, out, _ = run_monitor(capsys, *argv)
        lines = [line for line in out.strip().splitlines() if line.startswith("error") or "error:" in line]
        assert status == 2 and phrase in out and len(lines) >= 1 and "Traceback" not in out, (argv, out)
    assert not (tmp_path.parent / "elsewhere").exists()


@pytest.fixture(scope="module")
def answered(store, mnist_file):
    """The registered version (verdict included) answering: its reference, and a function of pictures to a window."""
    from pipeline.evaluate import drift_reference
    from pipeline.monitoring.drift import Sample
    from pipeline.monitoring.features import input_features
    from pipeline.serving.classifier import load_classifier

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store["uri"])
        model = load_classifier(MODEL)
    reference = drift_reference(model, reference_split(mnist_file))
    with np.load(mnist_file) as data:
        pool_x, pool_y = data["x_test"], data["y_test"]

    def window(pixels: np.ndarray) -> Sample:
        answers = model.answer(pixels)
        return Sample(input_features(pixels), answers.probabilities.argmax(axis=1), answers.probabilities.max(axis=1),
                      answers.is_digit)

    return reference, window, pool_x, pool_y


def test_drift_checks_on_real_digits_stay_calm_and_catch_three_kinds_of_change(answered):
    from scipy.ndimage import grey_dilation

    from pipeline.monitoring.drift import DriftSettings, compare

    reference, window, x, y = answered
    settings = DriftSettings()
    order = np.random.default_rng(7).permutation(len(x))
    alarms = [compare(reference, window(x[order[start:start + 300]]), settings).status == "drift"
              for start in range(0, 20 * 300, 300)]
    failed = [[c.name for c in compare(reference, window(x[order[start:start + 300]]), settings).failed]
              for start, alarm in zip(range(0, 6000, 300), alarms) if alarm]
    assert sum(alarms) < 1, failed  # 20 windows of held-out digits: no alarm

    fresh = x[order[6000:6300]]
    thick = compare(reference, window(grey_dilation(fresh, size=(1, 3, 3))), settings)
    assert thick.status == "drift" and "feature:ink_fraction" in [c.name for c in thick.failed]
    shifted = compare(reference, window(np.roll(fresh, 5, axis=2)), settings)
    assert shifted.status == "drift" and {"feature:com_dx", "feature:bbox_left"} & {c.name for c in shifted.failed}
    ones = x[y == 1][:300]
    flooded = compare(reference, window(ones), settings)
    assert flooded.status == "drift" and "class_mix" in [c.name for c in flooded.failed]

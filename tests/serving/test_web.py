"""The web app: the API through Flask's test client, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from pipeline.serving.served import LOCAL_FILE_NOTE
from pipeline.serving.web import MAX_UPLOAD_BYTES, create_app
from tests.conftest import free_port

from tests.serving.fixtures import (  # noqa: F401
    REPO, mnist_file, one_digit_per_class, seven, tiny_model_path, vertical_one)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def canvas_data_url() -> str:
    """What the page sends: a 280x280 black canvas with a white vertical stroke, as a PNG data URL."""
    canvas = Image.new("RGB", (280, 280), "black")
    ImageDraw.Draw(canvas).line([(140, 50), (140, 230)], fill="white", width=18)
    return "data:image/png;base64," + base64.b64encode(png_bytes(canvas)).decode()


@pytest.fixture(scope="module")
def client(tiny_model_path):
    app = create_app(str(tiny_model_path))
    app.testing = True
    return app.test_client()


def assert_prediction(response) -> dict:
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"label", "confidence", "probabilities", "digit_check"}  # a .keras file: no verdict
    assert body["digit_check"] == LOCAL_FILE_NOTE
    assert 0 <= body["label"] <= 9 and len(body["probabilities"]) == 10
    assert body["confidence"] == max(body["probabilities"])
    return body


def assert_json_error(response, status: int, *phrases: str) -> None:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    message = response.get_json()["error"]
    for phrase in phrases:
        assert phrase in message, message


def test_page_has_canvas_buttons_and_upload(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for element in ('id="pad"', 'id="predict"', 'id="clear"', 'type="file"', 'id="bars"'):
        assert element in html
    assert client.get("/static/app.js").status_code == 200


def test_model_is_loaded_lazily(tiny_model_path):
    app = create_app(str(tiny_model_path))
    assert app.test_client().get("/healthz").get_json() == {
        "status": "ok", "model": str(tiny_model_path), "loaded": False,
        "prediction_log": {"enabled": False, "reason": "not configured"}}


def test_upload_a_photo(client):
    body = assert_prediction(
        client.post("/api/predict", data={"image": (io.BytesIO(png_bytes(vertical_one(300))), "one.png")})
    )
    assert body["label"] == 1


def test_upload_jpeg_and_bmp(client):
    for fmt in ("JPEG", "BMP"):
        buffer = io.BytesIO()
        seven(mode="RGB", ink=(20, 20, 120), paper=(240, 235, 220)).save(buffer, format=fmt)
        buffer.seek(0)
        assert_prediction(client.post("/api/predict", data={"image": (buffer, f"seven.{fmt.lower()}")}))


def test_upload_one_digit_of_each_class(client, mnist_file):
    for picture, label in one_digit_per_class(mnist_file):
        body = assert_prediction(client.post("/api/predict", data={"image": (io.BytesIO(png_bytes(picture)), f"{label}.png")}))
        assert body["label"] == label


def test_canvas_data_url(client):
    body = assert_prediction(client.post("/api/predict", json={"image": canvas_data_url()}))
    assert body["label"] == 1


def test_non_image_upload_is_400(client):
    response = client.post("/api/predict", data={"image": (io.BytesIO(b"%PDF-1.4 not an image"), "scan.pdf")})
    assert_json_error(response, 400, "scan.pdf", "not a readable image")


def test_empty_upload_is_400(client):
    assert_json_error(client.post("/api/predict", data={"image": (io.BytesIO(b""), "empty.png")}), 400, "empty")


def test_blank_canvas_is_400(client):
    blank = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (280, 280)))).decode()
    assert_json_error(client.post("/api/predict", json={"image": blank}), 400, "no digit")


def test_oversized_upload_is_413(client):
    big = io.BytesIO(b"\x89PNG" + bytes(MAX_UPLOAD_BYTES + 1024))
    assert_json_error(client.post("/api/predict", data={"image": (big, "big.png")}), 413, "at most 5 MB")
    assert_json_error(
        client.post("/api/predict", json={"image": "data:image/png;base64," + "A" * (MAX_UPLOAD_BYTES + 4)}), 413
    )


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"data": {"photo": (io.BytesIO(b"x"), "x.png")}}, 'no file field "image"'),
        ({"data": {"image": "just text"}}, 'no file field "image"'),
        ({"json": {"picture": "data:image/png;base64,AAAA"}}, '"image" key'),
        ({"json": ["data:image/png;base64,AAAA"]}, '"image" key'),
        ({"data": b'{"image": ', "content_type": "application/json"}, "not valid JSON (Expecting value at line 1"),
        ({"data": b'{"image": "\xff"}', "content_type": "application/json"}, "not UTF-8 JSON"),
        ({"json": {"image": 42}}, "data URL string"),
        ({"json": {"image": "https://example.com/seven.png"}}, "not a data:image"),
        ({"json": {"image": "data:image/png;base64,@@@@"}}, "invalid base64"),
        ({"data": "{not json", "content_type": "application/json"}, "not valid JSON (Expecting property name"),
        ({"data": b"\x89PNG...", "content_type": "image/png"}, "unsupported content type"),
    ],
)
def test_wrong_fields_are_400(client, kwargs, phrase):
    assert_json_error(client.post("/api/predict", **kwargs), 400, phrase)


def test_keeps_serving_after_bad_requests(client):
    client.post("/api/predict", data={"image": (io.BytesIO(b"junk"), "junk.png")})
    client.post("/api/predict", json={"image": "data:image/png;base64,!!"})
    client.post("/api/predict", data={"image": (io.BytesIO(bytes(MAX_UPLOAD_BYTES + 1)), "big.png")})
    assert client.get("/api/predict").status_code == 405
    assert_prediction(client.post("/api/predict", json={"image": canvas_data_url()}))


def test_unloadable_model_is_503(tmp_path):
    app = create_app(str(tmp_path / "missing.keras"))
    response = app.test_client().post("/api/predict", json={"image": canvas_data_url()})
    assert_json_error(response, 503, "missing.keras")


# --- the real server and a real browser ----------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def browser_or_skip() -> None:
    """Skip without Chromium/chromedriver/selenium, except in CI where they must be installed."""
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = (
            f"browser test needs {', '.join(missing)}: "
            "apt-get install -y chromium chromium-driver && pip install selenium"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    """`python -m pipeline web` on a free loopback port; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "web", "--host", "127.0.0.1", "--port", str(port),
             "--model", str(tiny_model_path), "--log-storage", f"sqlite:///{log.parent / 'predictions.db'}"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    if json.load(response)["loaded"]:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"web server did not start:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def test_real_server_answers_and_survives_bad_requests(server):
    def post(body: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"{server}/api/predict", data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    status, body = post(b'{"image": "data:image/png;base64,!!"}', "application/json")
    assert status == 400 and "base64" in body["error"]
    status, body = post(b"not json", "application/json")
    assert status == 400
    status, body = post(json.dumps({"image": canvas_data_url()}).encode(), "application/json")
    assert status == 200 and body["label"] == 1


def start_browser():
    """A headless Chromium driven by selenium (call `browser_or_skip` first)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=900,820", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    browser_or_skip()
    driver = start_browser()
    yield driver
    driver.quit()


def shown_label(driver, previous: str = "?") -> str:
    """The digit the page shows once the prediction arrived (fails after 30 s)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        text = d.find_element("id", "label").text.strip()
        return text if text.isdigit() and text != previous else False

    return WebDriverWait(driver, 30).until(ready)


@pytest.mark.browser
@pytest.mark.slow
def test_one_digit_of_each_class_in_chromium(server, browser, mnist_file, tmp_path):
    browser.get(server)
    previous = "?"
    for picture, label in one_digit_per_class(mnist_file):
        path = tmp_path / f"digit_{label}.png"
        picture.save(path)
        browser.find_element("id", "file").send_keys(str(path))
        previous = shown_label(browser, previous=previous)
        assert previous == str(label)


@pytest.mark.browser
@pytest.mark.slow
def test_draw_and_upload_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    browser.get(server)
    pad = browser.find_element("id", "pad")
    # A vertical stroke down the middle of the 280x280 pad (offsets are from its centre).
    ActionChains(browser).move_to_element_with_offset(pad, 0, -90).click_and_hold() \
        .move_by_offset(0, 45).move_by_offset(0, 45).move_by_offset(0, 45).move_by_offset(0, 45) \
        .release().perform()
    browser.find_element("id", "predict").click()
    assert shown_label(browser) == "1"
    bars = browser.find_elements("css selector", "#bars li")
    assert len(bars) == 10
    assert "top" in bars[1].get_attribute("class")
    assert browser.find_element("id", "confidence").text.endswith("% sure")
    screenshot = Path(os.environ.get("WEB_SCREENSHOT", "/tmp/web.png"))
    browser.save_screenshot(str(screenshot.with_name(screenshot.stem + "-drawn.png")))

    browser.find_element("id", "clear").click()
    assert browser.find_element("id", "label").text == "?"
    browser.find_element("id", "predict").click()
    assert browser.find_element("id", "error").text == "draw a digit first"

    photo = tmp_path / "seven.jpg"
    seven(size=(640, 480), mode="RGB", ink=(30, 30, 90), paper=(235, 230, 215)).save(photo, quality=85)
    browser.find_element("id", "file").send_keys(str(photo))
    label = shown_label(browser, previous="?")
    assert label.isdigit()
    assert browser.find_element("id", "preview").is_displayed()

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    browser.find_element("id", "file").send_keys(str(not_an_image))
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "error").is_displayed())
    assert "not a readable image" in browser.find_element("id", "error").text

    browser.find_element("id", "file").send_keys(str(photo))
    shown_label(browser, previous="?")
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

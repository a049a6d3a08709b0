"""`dvc plots show` offline: the page template scripts/setup writes carries Vega itself, so real DVC's
page draws the accuracy, loss and confusion charts in a Chromium that cannot reach any network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import dvc

TEMPLATE_SCRIPT = REPO_ROOT / "scripts" / "plots_template.py"
CDN_URL = re.compile(r"https?://[^/\s\"']*(?:cdn|unpkg)", re.IGNORECASE)
REMOTE_SCRIPT = re.compile(r"<script[^>]*\ssrc\s*=\s*[\"']?https?://", re.IGNORECASE)

# Mirrors the plots of the repo's dvc.yaml: the two top-level curves and the evaluate stage's confusion matrix.
PLOTS_YAML = """\
plots:
  - training curves:
      template: linear
      x: epoch
      y:
        metrics/train_history.csv: [accuracy, val_accuracy]
  - training loss:
      template: linear
      x: epoch
      y:
        metrics/train_history.csv: [loss, val_loss]
  - metrics/confusion.csv:
      template: confusion
      x: predicted
      y: actual
"""
TRAIN_HISTORY_CSV = """\
epoch,loss,accuracy,val_loss,val_accuracy
1,0.51,0.83,0.046,0.986
2,0.14,0.96,0.035,0.989
3,0.09,0.97,0.031,0.991
"""
CONFUSION_CSV = "actual,predicted\n7,7\n2,2\n1,1\n0,0\n4,9\n9,9\n1,7\n"
# The divs DVC writes, named after the plot ids above.
CHART_DIVS = ("training_curves", "training_loss", "metrics_confusion_csv")

# For each plot div: whether Vega drew something, in an SVG with marks or a canvas with a visible pixel.
DRAWN_CHARTS_JS = """
return Object.fromEntries([...document.querySelectorAll("body > div[id]")].map(div => {
  const svg = div.querySelector("svg.marks"), canvas = div.querySelector("canvas.marks");
  let drawn = false;
  if (svg) {
    drawn = svg.querySelectorAll("path, rect, text").length > 0;
  } else if (canvas && canvas.width > 0 && canvas.height > 0) {
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    drawn = pixels.some((value, index) => index % 4 === 3 && value > 0);
  }
  return [div.id, drawn];
}));
"""

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else shutil.which("chromedriver")
# Headless and cut off: every request goes to a dead proxy (loopback included) and no host name resolves.
OFFLINE_CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND",
)


@pytest.fixture(scope="module")
def offline_template(tmp_path_factory) -> Path:
    """A template written now by the script setup runs, so the test does not depend on .dvc/'s copy."""
    path = tmp_path_factory.mktemp("template") / "offline_plots.html"
    result = subprocess.run([sys.executable, str(TEMPLATE_SCRIPT), str(path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def test_template_keeps_dvc_placeholder_and_loads_nothing_remote(offline_template):
    page = offline_template.read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1
    assert "{scripts}" not in page  # where DVC would put its CDN <script> tags
    assert not CDN_URL.search(page) and not REMOTE_SCRIPT.search(page)
    assert "window.vegaEmbed=" in page  # DVC's plot divs call vegaEmbed('#id', spec)


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory, offline_template) -> Path:
    """Real `dvc plots show` in a minimal git + DVC project configured with the template."""
    project = tmp_path_factory.mktemp("plots_project")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc("init", "-q", project=project)
    (project / "metrics").mkdir()
    (project / "metrics" / "train_history.csv").write_text(TRAIN_HISTORY_CSV)
    (project / "metrics" / "confusion.csv").write_text(CONFUSION_CSV)
    (project / "dvc.yaml").write_text(PLOTS_YAML)
    shutil.copy(offline_template, project / ".dvc" / "offline_plots.html")
    dvc("config", "plots.html_template", "offline_plots.html", project=project)  # relative to .dvc/
    dvc("plots", "show", project=project)
    return project / "dvc_plots" / "index.html"


@pytest.fixture(scope="module")
def offline_chromium(tmp_path_factory):
    """Skip without Chromium/chromedriver/selenium, except in CI where they must be installed."""
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"offline plots test needs {', '.join(missing)}: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (*OFFLINE_CHROMIUM_ARGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.browser
@pytest.mark.slow
def test_dvc_plots_render_without_network(plots_page, offline_chromium):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    assert not REMOTE_SCRIPT.search(plots_page.read_text(encoding="utf-8"))
    offline_chromium.get(plots_page.as_uri())
    expected = dict.fromkeys(CHART_DIVS, True)
    try:
        WebDriverWait(offline_chromium, 30).until(lambda d: d.execute_script(DRAWN_CHARTS_JS) == expected)
    except TimeoutException:
        console = [entry["message"] for entry in offline_chromium.get_log("browser")]
        pytest.fail(f"charts drawn: {offline_chromium.execute_script(DRAWN_CHARTS_JS)}, expected {expected}\n"
                    + "\n".join(console[-10:]))

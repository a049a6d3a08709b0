"""A day in production on a tiny project of its own: serve the champion, watch its traffic, learn from
users' labels, retrain with `dvc repro`, promote by the rule, and watch again.

Real DVC, a real MLflow store, the real `serve` process on loopback, its SQLite prediction log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_project
from tests.e2e.conftest import dvc, project_env, run, tiny_params
from tests.e2e.test_serving import post, running

pytestmark = pytest.mark.slow

WINDOW = 300
LABELLED = 260  # drifted pictures users label: over evaluate.reference_min_feedback (200)


def thick(pixels: np.ndarray) -> np.ndarray:
    """The same digits drawn with a much broader pen."""
    from scipy.ndimage import grey_dilation

    return grey_dilation(pixels, size=(1, 4, 4))


def traffic(project: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test digits outside the project's test split, in random order (never trained or tested on)."""
    with np.load(project / "data" / "raw" / "mnist.npz") as raw:
        x, y = raw["x_test"], raw["y_test"]
    with np.load(project / "data" / "prepared" / "test.npz") as test:
        tested = {image.tobytes() for image in test["x"]}
    unseen = np.array([index for index, image in enumerate(x) if image.tobytes() not in tested])
    order = np.random.default_rng(seed).permutation(unseen)
    return x[order], y[order]


def invoke(base: str, pictures: np.ndarray) -> tuple[list[str], list[str]]:
    """The prediction ids and the answering versions of the pictures, sent 50 at a time."""
    ids, versions = [], []
    for start in range(0, len(pictures), 50):
        body = json.dumps({"inputs": pictures[start:start + 50].tolist()}).encode()
        request = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            answer = json.load(response)
            versions.append(response.headers["X-Model-Version"])
        ids += answer["prediction_ids"]
    return ids, versions


def monitor(project: Path) -> tuple[int, str, dict]:
    result = run([sys.executable, "-m", "pipeline", "monitor", "--last", str(WINDOW)], project, check=False)
    return result.returncode, result.stdout + result.stderr, json.loads((project / "monitoring" / "drift.json").read_text())


def settle(base: str, version: str | None = None, timeout_s: float = 60.0) -> None:
    """Wait until the log has written what it was given (and, given `version`, the server follows it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            health = json.load(response)
        if health["prediction_log"]["queued"] == 0 and version in (None, health["model_version"]):
            time.sleep(0.5)  # the batch in the writer's hands
            return
        time.sleep(0.3)
    pytest.fail(f"the server did not settle: {health}")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("production"))
    # 1000 test digits of a 2-epoch model: accuracy moves by a point between runs, so "equal on test" is wide
    tiny_params(project / "params.yaml", **{"promote.margin": 0.02})
    dvc("repro", project=project)
    return project


def test_a_day_in_production(project, tmp_path):
    record: dict = {}  # what README's "In production" quotes (written where PRODUCTION_LOOP_RECORD says)
    started = time.monotonic()
    x, y = traffic(project, seed=0)
    normal, drifted, drifted_later = x[:WINDOW], thick(x[WINDOW:WINDOW + LABELLED + 40]), thick(x[-WINDOW:])
    drifted_labels = y[WINDOW:WINDOW + LABELLED + 40]
    command = [sys.executable, "-m", "pipeline", "serve", "--refresh-s", "1", "--port"]
    with running(command, project, tmp_path / "serve.log", project_env(project)) as base:
        # 1. normal traffic: no alarm
        invoke(base, normal)
        settle(base)
        status, out, report = monitor(project)
        assert status == 0 and report["status"] == "ok", out
        record["normal"] = {"exit": status, "failed": report["failed"]}

        # 2. drifted traffic: an alarm that names the feature
        ids, versions = invoke(base, drifted)
        settle(base)
        status, out, report = monitor(project)
        assert status == 1 and report["status"] == "drift", out
        assert "feature:ink_fraction" in report["failed"] and "feature:ink_fraction" in out
        record["drifted"] = {"exit": status, "failed": report["failed"]}

        # 3. users label some of the drifted pictures (one says one is no digit), export, retrain
        for index, (prediction_id, label) in enumerate(zip(ids[:LABELLED], drifted_labels[:LABELLED])):
            given = "not-digit" if index == 0 else int(label)
            assert post(f"{base}/feedback", json.dumps({"id": prediction_id, "label": given}).encode())[0] == 200
        exported = run([sys.executable, "-m", "pipeline", "feedback", "export"], project)
        assert f"exported {LABELLED} labelled pictures ({LABELLED - 1} digits, 1 not a digit)" in exported.stdout
        assert (project / "data" / "feedback" / "feedback.npz.dvc").is_file()
        status = dvc("status", project=project).stdout
        assert "preprocess" in status and "fetch" not in status.split("preprocess")[0]
        repro_started = time.monotonic()
        repro = dvc("repro", project=project)
        record["repro_s"] = round(time.monotonic() - repro_started, 1)
        ran = [line.split("'")[1] for line in repro.stdout.splitlines() if line.startswith("Running stage")]
        assert ran == ["preprocess", "tune", "train", "evaluate"], repro.stdout

        # 4. the new version scores better on the feedback holdout and is promoted by the rule
        registry = run([sys.executable, "-m", "pipeline", "registry"], project).stdout
        feedback_metrics = json.loads((project / "metrics" / "feedback.json").read_text())["feedback"]
        assert feedback_metrics["holdout_images"] >= 50 and feedback_metrics["train_images"] >= 150
        decision = champion_decision(project)
        assert str(decision["champion"]) == "2", (decision, registry)
        assert "better on the feedback holdout" in decision["reason"] or "beats champion" in decision["reason"], decision
        assert float(decision["candidate_feedback"]) > float(decision["champion_feedback"]), decision
        record.update(decision=decision, feedback=feedback_metrics, stages=ran)

        # 5. the server follows the new champion; the same kind of traffic raises no alarm against its reference
        settle(base, version="2")
        _, versions = invoke(base, drifted_later)
        assert set(versions) == {"2"}
        settle(base)
        status, out, report = monitor(project)
        assert status == 0 and report["status"] == "ok", out
        record["after"] = {"exit": status, "failed": report["failed"]}
    record["loop_s"] = round(time.monotonic() - started, 1)
    if target := os.environ.get("PRODUCTION_LOOP_RECORD"):
        Path(target).write_text(json.dumps(record, indent=2))


def champion_decision(project: Path) -> dict[str, str]:
    """The champion's version and the decision tags written on version 2."""
    script = ("import json, mlflow\n"
              "from pipeline.core.tracking import configure_tracking\n"
              "configure_tracking(); c = mlflow.MlflowClient()\n"
              "v = c.get_model_version('mnist-cnn', '2'); tags = v.tags\n"
              "print(json.dumps({'champion': c.get_model_version_by_alias('mnist-cnn', 'champion').version,\n"
              "  'reason': tags.get('promotion_reason', ''), 'candidate_feedback': tags.get('compared_candidate_feedback_accuracy', '0'),\n"
              "  'champion_feedback': tags.get('compared_champion_feedback_accuracy', '1')}))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=project, env=project_env(project), capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])

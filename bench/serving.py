"""Latency of one request to the registered champion, served by the real `mlflow models serve`."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

log = logging.getLogger("bench.serve")

CHAMPION = "champion"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def champion_version(model_name: str) -> str | None:
    """The version behind `models:/<name>@champion` in the project's registry, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.core.tracking import configure_tracking, registry_uri

    configure_tracking()
    try:
        return MlflowClient(registry_uri=registry_uri()).get_model_version_by_alias(model_name, CHAMPION).version
    except MlflowException:
        return None


def latency_summary(seconds: list[float]) -> dict:
    milliseconds = np.asarray(seconds) * 1000
    return {"requests": len(seconds), "median_ms": round(float(np.median(milliseconds)), 2),
            "p95_ms": round(float(np.percentile(milliseconds, 95)), 2),
            "min_ms": round(float(milliseconds.min()), 2), "max_ms": round(float(milliseconds.max()), 2)}


def wait_until_ready(server: subprocess.Popen, base_url: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with status {server.returncode}")
        try:
            if requests.get(f"{base_url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer /ping within {timeout_s:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """Stop the server's process group (the CLI and the workers it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue


def measure_serving(model_name: str, image: np.ndarray, requests_timed: int = 20, warmup: int = 3,
                    startup_timeout_s: float = 300) -> dict:
    """Serve the champion on a free loopback port, POST one image `warmup` times, then time
    `requests_timed` POSTs (each a new HTTP connection, as a client would make). Returns
    latencies, or {"skipped": why} when no champion is registered."""
    import requests

    from pipeline.core.tracking import tracking_uri

    version = champion_version(model_name)
    uri = f"models:/{model_name}@{CHAMPION}"
    if version is None:
        message = f"no {uri} in {tracking_uri()}; run `dvc repro` to register and promote one"
        log.warning("serving latency skipped: %s", message)
        return {"skipped": message}
    port = free_port()
    venv_bin = Path(sys.executable).parent  # `mlflow` and the `uvicorn` it starts live next to this Python
    command = [str(venv_bin / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(),
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    log.info("serving %s (version %s) on port %d", uri, version, port)
    server_log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, env=env, stdout=server_log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: its workers stop with it
    base_url = f"http://127.0.0.1:{port}"
    body = json.dumps({"inputs": image.reshape(1, 28, 28, 1).astype(float).tolist()})
    headers = {"Content-Type": "application/json"}
    try:
        started = time.perf_counter()
        try:
            wait_until_ready(server, base_url, startup_timeout_s)
        except RuntimeError as error:
            server_log.seek(0)
            raise PipelineError(f"{error}; its last output:\n{server_log.read()[-2000:]}") from None
        startup_s = time.perf_counter() - started
        seconds = []
        for index in range(warmup + requests_timed):
            sent = time.perf_counter()
            response = requests.post(f"{base_url}/invocations", data=body, headers=headers, timeout=60)
            elapsed = time.perf_counter() - sent
            response.raise_for_status()
            if index >= warmup:
                seconds.append(elapsed)
        predicted = int(np.argmax(response.json()["predictions"][0]))
    finally:
        stop(server)
        server_log.close()
    return {"model_uri": uri, "version": version, "startup_s": round(startup_s, 1), "warmup_requests": warmup,
            "predicted_digit": predicted, **latency_summary(seconds)}

"""`python -m bench serve`: the project's server against `mlflow models serve`, same model version, one run.

Both servers run side by side on loopback ports, each in its own process group. Measured, per server:
- one-image latency: `--requests` POSTs per server, alternating between the two servers request by
  request, each client on one keep-alive connection with TCP_NODELAY (as `requests` and browsers do);
- throughput: 1 and 8 clients (threads, one keep-alive connection each) posting one image per request
  for `--seconds`; any request not answered 200 counts as lost;
- peak memory: the resident memory of the server's whole process tree, sampled every 50 ms from
  start-up to the end.
Three more servers join the latency rounds (not the throughput ones): the project's with
`--no-digit-verdict` (the digit verdict's cost per request) and with `--no-log` (the prediction log's
cost), and the floor (`bench.floor`: the same HTTP stack and JSON decoding, no model), which the
project's latency is divided by. Latency is measured twice: on keep-alive connections, and with a new
connection per request (connect, request, answer, close), as clients without a pool do.
The project's servers log to a scratch SQLite file, never to the project's own log.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

log = logging.getLogger("bench.serve")

CHAMPION = "champion"
SERVERS = ("project", "mlflow", "project_no_verdict", "project_no_log", "floor")
THROUGHPUT_SERVERS = ("project", "mlflow")
LATENCY_ROUNDS = {"latency": False, "latency_new_connection": True}  # result key: a new connection per request
CLIENT_COUNTS = (1, 8)


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


def server_command(kind: str, uri: str, port: int, log_storage: str = "") -> list[str]:
    venv_bin = Path(sys.executable).parent  # `mlflow` and the `uvicorn` it starts live next to this Python
    if kind == "floor":
        return [sys.executable, str(Path(__file__).with_name("floor.py")), "--host", "127.0.0.1", "--port", str(port)]
    if kind.startswith("project"):
        logging_options = ["--no-log"] if kind == "project_no_log" else ["--log-storage", log_storage]
        return [sys.executable, "-m", "pipeline", "serve", "--model", uri, "--host", "127.0.0.1", "--port", str(port),
                *(["--no-digit-verdict"] if kind == "project_no_verdict" else []), *logging_options]
    return [str(venv_bin / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


class Client:
    """One keep-alive HTTP connection with TCP_NODELAY (`fresh`: a new one per request, its connect
    and close timed with it); `post` returns (status, seconds, body)."""

    def __init__(self, port: int, timeout_s: float = 60.0, fresh: bool = False) -> None:
        self.port, self.timeout_s, self.fresh = port, timeout_s, fresh
        self.connection: http.client.HTTPConnection | None = None

    def connect(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def post(self, body: bytes) -> tuple[int, float, bytes]:
        started = time.perf_counter()
        try:
            self.connection = self.connection or self.connect()
            self.connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            data = response.read()
            status = response.status
            if self.fresh:
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            status, data = 0, b""
        return status, time.perf_counter() - started, data

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def tree_rss_mib(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / (1024 * 1024)


class Server:
    """A server process (own process group) on a free port, its log in a temporary file, and the
    peak resident memory of its process tree."""

    def __init__(self, kind: str, uri: str, env: dict[str, str], log_storage: str = "") -> None:
        self.kind, self.port = kind, free_port()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(server_command(kind, uri, self.port, log_storage), env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.peak_rss_mib = 0.0
        self.sampling = True
        threading.Thread(target=self.sample_memory, daemon=True).start()

    def sample_memory(self) -> None:
        while self.sampling:
            self.peak_rss_mib = max(self.peak_rss_mib, tree_rss_mib(self.process.pid))
            time.sleep(0.05)

    def wait_until_ready(self, timeout_s: float) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                    connection.request("GET", "/ping")
                    if connection.getresponse().status == 200:
                        return time.perf_counter() - started
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        self.log.seek(0)
        raise PipelineError(f"the {self.kind} server did not answer /ping; its last output:\n{self.log.read()[-2000:]}")

    def stop(self) -> None:
        self.sampling = False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def latency_summary(seconds: list[float]) -> dict:
    milliseconds = np.asarray(seconds) * 1000
    return {"requests": len(seconds), "p50_ms": round(float(np.percentile(milliseconds, 50)), 3),
            "p95_ms": round(float(np.percentile(milliseconds, 95)), 3),
            "p99_ms": round(float(np.percentile(milliseconds, 99)), 3),
            "min_ms": round(float(milliseconds.min()), 3), "max_ms": round(float(milliseconds.max()), 3)}


def measure_latency(ports: dict[str, int], body: bytes, requests: int, warmup: int = 20,
                    fresh: bool = False) -> dict[str, dict]:
    """Alternate one request to each server, `warmup` untimed rounds then `requests` timed ones
    (`fresh`: each on a new connection)."""
    clients = {kind: Client(port, fresh=fresh) for kind, port in ports.items()}
    seconds: dict[str, list[float]] = {kind: [] for kind in ports}
    predicted: dict[str, int] = {}
    for index in range(warmup + requests):
        for kind, client in clients.items():
            status, elapsed, data = client.post(body)
            if status != 200:
                raise PipelineError(f"the {kind} server answered {status} to a valid request: {data[:300]!r}")
            if index >= warmup:
                seconds[kind].append(elapsed)
            if kind != "floor":  # its answer is fixed
                predicted[kind] = int(np.argmax(json.loads(data)["predictions"][0]))
    for client in clients.values():
        client.close()
    return {kind: {**latency_summary(seconds[kind]), **({"predicted_digit": predicted[kind]} if kind in predicted else {})}
            for kind in ports}


def measure_throughput(port: int, body: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads posting one image per request for `seconds`: answered and lost requests."""
    answered = [0] * clients
    lost = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def work(index: int) -> None:
        client = Client(port)
        start.wait()
        while time.perf_counter() < deadline[0]:
            status, elapsed, _ = client.post(body)
            if status == 200:
                answered[index] += 1
                latencies[index].append(elapsed)
            else:
                lost[index] += 1
        client.close()

    threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    merged = [value for values in latencies for value in values]
    return {"clients": clients, "seconds": round(wall, 2), "answered": sum(answered), "lost": sum(lost),
            "requests_per_s": round(sum(answered) / wall, 1),
            "p50_ms": round(float(np.percentile(merged, 50)) * 1000, 3) if merged else None,
            "p99_ms": round(float(np.percentile(merged, 99)) * 1000, 3) if merged else None}


def serving_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {package: version(package) for package in ("mlflow", "onnxruntime", "uvicorn")}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def run_serve_benchmark(model_name: str, image: np.ndarray, requests: int = 300, seconds: float = 15.0,
                        startup_timeout_s: float = 300.0) -> dict:
    """Serve the champion's version with both servers and measure them; see the module docstring."""
    from bench.machine import machine_info
    from pipeline.core.tracking import tracking_uri

    version = champion_version(model_name)
    if version is None:
        raise PipelineError(f"no models:/{model_name}@{CHAMPION} in {tracking_uri()}; run `dvc repro` to "
                            "register and promote one")
    uri = f"models:/{model_name}/{version}"  # the same version for both, even if the alias moves meanwhile
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    body = json.dumps({"inputs": image.reshape(1, 28, 28, 1).astype(int).tolist()}).encode()
    servers: dict[str, Server] = {}
    results: dict[str, dict] = {}
    scratch = tempfile.TemporaryDirectory(prefix="bench-serve-log-")
    log_storage = f"sqlite:///{Path(scratch.name) / 'predictions.db'}"  # bench traffic stays out of the project's log
    try:
        for kind in SERVERS:
            log.info("starting the %s server for %s", kind, uri)
            servers[kind] = Server(kind, uri, env, log_storage)
            results[kind] = {"startup_s": round(servers[kind].wait_until_ready(startup_timeout_s), 2)}
        ports = {kind: server.port for kind, server in servers.items()}
        for key, fresh in LATENCY_ROUNDS.items():
            log.info("one-image latency (%s): %d requests per server, alternating", key, requests)
            for kind, latency in measure_latency(ports, body, requests, fresh=fresh).items():
                results[kind][key] = latency
        for clients in CLIENT_COUNTS:
            for kind in THROUGHPUT_SERVERS:
                server = servers[kind]
                log.info("throughput: %s server, %d client(s), %g s", kind, clients, seconds)
                results[kind][f"throughput_{clients}_clients"] = measure_throughput(server.port, body, clients, seconds)
    finally:
        for kind, server in servers.items():
            server.stop()
            results.setdefault(kind, {})["peak_rss_mib"] = round(server.peak_rss_mib, 1)
        scratch.cleanup()
    project, mlflow_, bare = results["project"], results["mlflow"], results["project_no_verdict"]
    unlogged, floor = results["project_no_log"], results["floor"]
    many = f"throughput_{CLIENT_COUNTS[-1]}_clients"
    return {
        "benchmark": "serve",
        "machine": machine_info(serving_versions()),
        "model": {"uri": uri, "name": model_name, "version": str(version)},
        "settings": {"latency_requests": requests, "throughput_seconds": seconds, "client_counts": list(CLIENT_COUNTS),
                     "body": "one test image as {\"inputs\": [[[[0..255]]]]} JSON integers"},
        "servers": results,
        "ratios": {
            "mlflow_over_project_latency_p50": ratio(mlflow_["latency"]["p50_ms"], project["latency"]["p50_ms"]),
            "project_over_floor_latency_p50": ratio(project["latency"]["p50_ms"], floor["latency"]["p50_ms"]),
            "project_over_floor_new_connection_latency_p50": ratio(project["latency_new_connection"]["p50_ms"],
                                                                   floor["latency_new_connection"]["p50_ms"]),
            "project_8_over_1_client_throughput": ratio(project[many]["requests_per_s"],
                                                        project["throughput_1_clients"]["requests_per_s"]),
            "project_over_mlflow_8_client_throughput": ratio(project[many]["requests_per_s"],
                                                             mlflow_[many]["requests_per_s"]),
            "verdict_on_over_off_latency_p50": ratio(project["latency"]["p50_ms"], bare["latency"]["p50_ms"]),
            "log_on_over_off_latency_p50": ratio(project["latency"]["p50_ms"], unlogged["latency"]["p50_ms"]),
        },
        "verdict_cost_p50_ms": round(project["latency"]["p50_ms"] - bare["latency"]["p50_ms"], 3),
        "log_cost_p50_ms": round(project["latency"]["p50_ms"] - unlogged["latency"]["p50_ms"], 3),
    }


def serve_markdown(record: dict) -> str:
    from bench.report import machine_line, number, table, times

    servers = record["servers"]

    def row(label, value):
        return [label, value(servers["project"]), value(servers["mlflow"])]

    rows = [row(f"One-image latency {p} (ms)", lambda s, p=p: number(s["latency"][f"{p}_ms"], ".2f"))
            for p in ("p50", "p95", "p99")]
    rows.append(row("One-image latency p50, new connection each (ms)",
                    lambda s: number(s["latency_new_connection"]["p50_ms"], ".2f")))
    for clients in record["settings"]["client_counts"]:
        key = f"throughput_{clients}_clients"
        rows.append(row(f"Throughput, {clients} client{'s' if clients > 1 else ''} (requests/s)",
                        lambda s, k=key: number(s[k]["requests_per_s"], ",.0f")))
        rows.append(row(f"Lost requests, {clients} client{'s' if clients > 1 else ''}", lambda s, k=key: str(s[k]["lost"])))
    rows += [row("Peak memory, process tree (MiB)", lambda s: number(s["peak_rss_mib"], ".0f")),
             row("Start-up to first /ping (s)", lambda s: number(s["startup_s"]))]
    ratios = record["ratios"]
    settings = record["settings"]
    return "\n".join([
        table(["", "`python -m pipeline serve`", "`mlflow models serve`"], rows),
        "",
        f"`{record['model']['uri']}` behind both servers in one run: {settings['latency_requests']} one-image "
        f"requests each, alternating; throughput over {settings['throughput_seconds']:g} s per row, keep-alive "
        f"connections. Latency p50: mlflow / project = {times(ratios['mlflow_over_project_latency_p50'])}; "
        f"project throughput, 8 clients / 1 client = {times(ratios['project_8_over_1_client_throughput'])}. "
        f"The floor (`bench/floor.py`: the same HTTP stack and JSON decoding, no model, a fifth server in the same "
        f"rounds): p50 {number(servers['floor']['latency']['p50_ms'], '.3f')} ms keep-alive, "
        f"{number(servers['floor']['latency_new_connection']['p50_ms'], '.3f')} ms with a new connection; "
        f"project / floor = {times(ratios['project_over_floor_latency_p50'])} keep-alive, "
        f"{times(ratios['project_over_floor_new_connection_latency_p50'])} new connection. "
        f"The digit verdict: p50 {number(servers['project']['latency']['p50_ms'], '.3f')} ms on, "
        f"{number(servers['project_no_verdict']['latency']['p50_ms'], '.3f')} ms off (`--no-digit-verdict`, another "
        f"server in the same rounds): {record['verdict_cost_p50_ms']:+.3f} ms, "
        f"{times(ratios['verdict_on_over_off_latency_p50'])}. "
        f"The prediction log: p50 {number(servers['project_no_log']['latency']['p50_ms'], '.3f')} ms with `--no-log`, "
        f"{record['log_cost_p50_ms']:+.3f} ms for logging ({times(ratios['log_on_over_off_latency_p50'])}). "
        f"{machine_line(record['machine'])}.",
    ])

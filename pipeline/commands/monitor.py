"""`python -m pipeline monitor`: does the served model's recent traffic still look like its reference?

Compares a window of the prediction log (`--since 24h` or `--last N`) with the drift reference
registered with the model version that answered it (`monitoring.reference`), prints a table, writes
`monitoring/report.html` and `monitoring/drift.json`, and records an MLflow run in the experiment
`monitor.experiment`, tagged with the version. Exit status: 0 when every check passes (or the window
is too small for a verdict, which it says), 1 when one fails, 2 for a usage or store error.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from pipeline.commands.common import log_storage_option, model_option, parser, positive
from pipeline.core.errors import PipelineError, exit_on_user_error

DRIFT_FILE, REPORT_FILE = "drift.json", "report.html"
DEFAULT_OUT = "monitoring"
DURATION = re.compile(r"^(?P<amount>\d+(\.\d+)?)(?P<unit>[smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_SINCE_S = 24 * UNIT_S["h"]  # the window when neither --since nor --last is given


def duration_s(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d` in seconds."""
    match = DURATION.match(text.strip())
    if not match or float(match["amount"]) <= 0:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write it like 30m, 24h or 7d")
    return float(match["amount"]) * UNIT_S[match["unit"]]


def parse_args(argv: list[str] | None):
    command = parser("monitor", "Compare a window of the prediction log with the served version's drift reference; "
                     "exit 1 when the traffic drifted.", model_option())
    window = command.add_mutually_exclusive_group()
    window.add_argument("--since", type=duration_s, metavar="DURATION",
                        help="the window: answers of the last 30m, 24h, 7d ... (default: 24h)")
    window.add_argument("--last", type=positive(int), metavar="N", help="the window: the newest N answers")
    log_storage_option(command)
    command.add_argument("--out", default=DEFAULT_OUT, help=f"folder for {REPORT_FILE} and {DRIFT_FILE} "
                         f"(default: {DEFAULT_OUT})")
    return command.parse_args(argv)


def window_label(args) -> str:
    if args.last:
        return f"the newest {args.last} answers"
    return f"answers of the last {(args.since or DEFAULT_SINCE_S) / 3600:g} h"


def settings_of(drift_params):
    from pipeline.monitoring.drift import DriftSettings

    return DriftSettings(**drift_params.model_dump())


def write_outputs(out: Path, report_dict: dict, html: str) -> tuple[Path, Path]:
    """drift.json and report.html, written beside their targets and swapped in together."""
    from pipeline.core.paths import staged_outputs

    drift_path, report_path = out / DRIFT_FILE, out / REPORT_FILE
    with staged_outputs() as staging:
        staging.path(drift_path).write_text(json.dumps(report_dict, indent=2, allow_nan=False))
        staging.path(report_path).write_text(html)
    return drift_path, report_path


def metric_name(check_name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", check_name)


def log_run(experiment: str, version, report, window: str, files: tuple[Path, Path]) -> str:
    """The report as an MLflow run of its own experiment, tagged with the version it judged."""
    import mlflow

    from pipeline.core import tracking

    mlflow.set_experiment(experiment_id=tracking.ensure_experiment(experiment))
    with mlflow.start_run(run_name=f"drift {version.name} v{version.version}") as run:
        mlflow.set_tags({"model_name": version.name, "model_version": str(version.version), "status": report.status,
                         "window": window, "failed_checks": ",".join(check.name for check in report.failed),
                         tracking.RUN_KIND_TAG: "monitor"})
        mlflow.log_metrics({"window_rows": report.n_window, "feedback_rows": report.n_feedback,
                            "failed_checks": len(report.failed),
                            **{f"p_{metric_name(check.name)}": check.p_value for check in report.checks
                               if check.p_value is not None},
                            **{f"stat_{metric_name(check.name)}": check.statistic for check in report.checks
                               if check.passed is not None}})
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from pipeline.commands.common import monitor_settings
    from pipeline.core.paths import path_problem
    from pipeline.core.runtime import setup_logging

    args = parse_args(argv)
    setup_logging()
    if problem := path_problem(args.out):
        raise PipelineError(f"--out {args.out!r}: {problem}")
    settings = monitor_settings(args.log_storage)
    if settings is None:
        raise PipelineError("no params.yaml here; run monitor inside the project, where monitor.storage names the log")

    from pipeline.monitoring.drift import compare
    from pipeline.monitoring.log import make_engine, read_rows, store_problem, window_sample
    from pipeline.monitoring.reference import registered_reference
    from pipeline.monitoring.report import render_html, terminal_table
    from pipeline.registry.store import champion_uri, client, is_not_found, store_failure
    from pipeline.serving.classifier import quiet_downloads, registered_version

    uri = args.model or champion_uri()
    mlflow_client = client()
    try:
        version = registered_version(mlflow_client, uri)
    except PipelineError:
        raise
    except Exception as error:
        if is_not_found(error):
            raise PipelineError(f"{uri} names no registered version; list them with `python -m pipeline registry`, "
                                "or pass --model models:/<name>/<version>") from None
        raise store_failure(f"looking up {uri}", error) from None
    quiet_downloads()
    with tempfile.TemporaryDirectory(prefix="mnist-reference-") as scratch:
        reference = registered_reference(version, Path(scratch))
    since = None if args.last else time.time() - (args.since or DEFAULT_SINCE_S)
    try:
        rows = read_rows(make_engine(settings.storage), since=since, last=args.last, version=str(version.version))
    except Exception as error:
        raise PipelineError(store_problem(settings.storage, error)) from None
    window = window_sample(rows)
    report = compare(reference, window, settings_of(settings.drift))
    label = f"{window_label(args)} of {version.name} v{version.version}"
    context = {"model": f"{version.name} version {version.version}", "window": label,
               "log": settings.storage, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    files = write_outputs(Path(args.out), report.to_dict(), render_html(report, reference, window, context))
    run_id = log_run(settings.experiment, version, report, label, files)
    print(terminal_table(report))
    print(f"window: {label}; report: {files[1]}, {files[0]}; MLflow run {run_id} (experiment {settings.experiment})")
    return 1 if report.status == "drift" else 0

"""Tuning throughput with 1 and 2 local workers on one shared study (a real RDB storage).

Each arm runs the real `python -m pipeline tune --workers N` on a fresh study of the same size,
pruning off so every trial costs the same, and reports finished trials per hour measured from the
first trial's start to the last one's end (process start-up excluded, as on a long-running cluster).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

log = logging.getLogger("bench.workers")


def arm_params(params_path: Path, storage: str, study: str, trials: int, workers: int, work_dir: Path) -> dict:
    """The project's params for one arm: its own study, and its best params and summary written into
    `work_dir`, never over the project's `paths.best_params` (which `dvc repro train` reads) or
    `paths.tune_summary`."""
    params = yaml.safe_load(params_path.read_text())
    params["tune"].update(storage=storage, study_name=study, n_trials=trials, pruner="none", workers=workers,
                          enqueue_preset=True)
    params["paths"].update(best_params=str(work_dir / f"best_params-{workers}.json"),
                           tune_summary=str(work_dir / f"tune-{workers}.json"))
    return params


def trials_per_hour(study) -> tuple[float, int, float]:
    """(throughput, finished trials, seconds from the first start to the last completion)."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    start = min(t.datetime_start for t in finished)
    end = max(t.datetime_complete for t in finished)
    seconds = (end - start).total_seconds()
    return 3600.0 * len(finished) / seconds, len(finished), seconds


def run_arm(params_path: Path, storage: str, trials: int, workers: int, work_dir: Path) -> dict:
    import optuna

    from pipeline.core.config import parse_params
    from pipeline.tuning.study import study_name

    name = f"bench-workers-{workers}-{uuid.uuid4().hex[:6]}"
    raw = arm_params(params_path, storage, name, trials, workers, work_dir)
    arm_file = work_dir / f"params-{workers}.yaml"
    arm_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work_dir / 'mlflow.db'}"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.tune", "--params", str(arm_file), "--workers", str(workers)],
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"tuning with {workers} workers failed: {result.stderr[-1500:]}")
    study = optuna.load_study(study_name=study_name(parse_params(raw)), storage=storage)
    throughput, finished, seconds = trials_per_hour(study)
    workers_seen = {t.user_attrs.get("worker") for t in study.get_trials(deepcopy=False)} - {None}
    log.info("%d worker(s): %d trials in %.0f s of trials (%.0f s with start-up): %.0f trials/hour",
             workers, finished, seconds, wall, throughput)
    return {"workers": workers, "finished_trials": finished, "trial_span_seconds": round(seconds, 1),
            "wall_seconds_with_startup": round(wall, 1), "trials_per_hour": round(throughput, 1),
            "distinct_worker_processes": len(workers_seen)}


def run_workers_benchmark(params_path: Path, storage: str, trials: int) -> dict:
    from bench.machine import machine_info

    scratch = Path("bench/out")  # inside the project: the stage writes its outputs only there
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="workers-", dir=scratch) as tmp:
        arms = [run_arm(params_path, storage, trials, workers, Path(tmp)) for workers in (1, 2)]
    return {"machine": machine_info(), "storage": storage.split("@")[-1], "trials": trials, "arms": arms,
            "speedup_2_vs_1": round(arms[1]["trials_per_hour"] / arms[0]["trials_per_hour"], 2)}


def workers_markdown(record: dict) -> str:
    lines = [f"Tuning throughput, {record['trials']} trials per arm, pruning off, storage {record['storage']}:", "",
             "| workers | TF threads each | trials | trial span (s) | trials/hour |", "|---|---|---|---|---|"]
    cores = record["machine"].get("usable_cores") or os.cpu_count() or 1
    for arm in record["arms"]:
        lines.append(f"| {arm['workers']} | {max(1, cores // arm['workers'])} | {arm['finished_trials']} | "
                     f"{arm['trial_span_seconds']} | {arm['trials_per_hour']} |")
    lines += ["", f"Speed-up of 2 workers over 1: {record['speedup_2_vs_1']}x."]
    return "\n".join(lines) + "\n"

"""Sprint benchmark: training seconds to 99.0 % test accuracy, `presets.sprint` against the reference,
over several seeds in one run.

For each seed the reference and the sprint each train in a freshly spawned process (bench.training's
`run_job`: the same clock, data and threads), one after the other, and stop at the first epoch whose
test accuracy reaches the target. The record gives every seed's figures, the median of each side
(a seed that never reaches the target counts as slower than any that does) and their ratio
under `time_to_99_0`.
"""

from __future__ import annotations

import logging
import math
import statistics

from bench.training import REFERENCE, TrainJob, default_dtype_policy, first_reaching, ratio, run_in_fresh_process, run_job
from pipeline.core.config import Params
from pipeline.core.errors import PipelineError

log = logging.getLogger("bench.sprint")

SPRINT = "sprint"
TARGET = 0.990


def median_seconds(seconds: list[float | None]) -> float | None:
    """The median time to the target; a run that never reached it (None) counts as infinitely slow,
    and a median that is such a run is None."""
    middle = statistics.median(math.inf if value is None else value for value in seconds)
    return None if math.isinf(middle) else middle


def sprint_jobs(params: Params, seeds: list[int], epochs_sprint: int, epochs_reference: int, train_limit: int,
                test_limit: int) -> list[TrainJob]:
    """Reference then sprint for each seed (alternating, so that a drifting machine hits both alike)."""
    for name in (REFERENCE, SPRINT):
        if name not in params.presets:
            raise PipelineError(f"params.yaml has no `presets.{name}`; the sprint benchmark compares the two")
    common = dict(tuned=False, runtime=params.runtime, train_split=params.paths.train_split,
                  test_split=params.paths.test_split, train_limit=train_limit, test_limit=test_limit,
                  inference_seconds=0.0, stop_at=TARGET)
    jobs = []
    for seed in seeds:
        jobs.append(TrainJob(role=REFERENCE, preset=REFERENCE, recipe=params.presets[REFERENCE], epochs=epochs_reference,
                             dtype_policy="float32", seed=seed, **common))  # as the seeds measured it
        jobs.append(TrainJob(role=SPRINT, preset=SPRINT, recipe=params.presets[SPRINT], epochs=epochs_sprint,
                             dtype_policy=default_dtype_policy(params), seed=seed, **common))  # as `train` would
    return jobs


def seed_row(result: dict) -> dict:
    reached = first_reaching(result["test_accuracy_by_epoch"], result["train_seconds_by_epoch"], TARGET)
    return {"seed": result["seed"], "epochs_trained": result["epochs"], "epochs_to_target": reached["epochs"],
            "seconds_to_target": reached["seconds"], "test_accuracy_by_epoch": result["test_accuracy_by_epoch"],
            "train_seconds_by_epoch": result["train_seconds_by_epoch"]}


def summarize(runs: dict[str, list[dict]]) -> dict:
    medians = {role: median_seconds([row["seconds_to_target"] for row in rows]) for role, rows in runs.items()}
    return {
        "median_seconds_to_target": medians,
        "seeds_reaching_target": {role: sum(row["seconds_to_target"] is not None for row in rows)
                                  for role, rows in runs.items()},
        "ratios_sprint_over_reference": {"time_to_99_0": ratio(medians[SPRINT], medians[REFERENCE])},
    }


def run_sprint_benchmark(params: Params, jobs: list[TrainJob]) -> dict:
    from bench.machine import load_average_1m, machine_info

    machine = machine_info()
    runs: dict[str, list[dict]] = {REFERENCE: [], SPRINT: []}
    results = []
    for number, job in enumerate(jobs, 1):
        log.info("run %d of %d: %s, seed %d, up to %d epochs, in a fresh process", number, len(jobs), job.role,
                 job.seed, job.epochs)
        result = run_in_fresh_process(run_job, job) | {"seed": job.seed}
        results.append(result)
        runs[job.role].append(seed_row(result))
    first = results[0]
    return {
        "benchmark": "sprint",
        "machine": {**machine, **first["versions"], "load_average_1m_at_end": load_average_1m()},
        "settings": {
            "target_test_accuracy": TARGET,
            "seeds": sorted({job.seed for job in jobs}),
            "max_epochs": {job.role: job.epochs for job in jobs},
            "dtype_policy": {job.role: job.dtype_policy for job in jobs},
            "runtime": params.runtime.model_dump(),
            "train_images": first["train_images"],
            "test_images": first["test_images"],
        },
        "recipes": {job.role: job.recipe.model_dump() for job in jobs},
        "parameters": {result["role"]: result["parameters"] for result in results},
        "runs": runs,
        **summarize(runs),
    }

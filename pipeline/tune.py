"""Stage 3: an Optuna study over the search space in `params.yaml`, every trial an MLflow run.

The study itself lives in `tune.storage` and continues across runs (`pipeline.tuning`). This stage
writes what `train` reads, the best values (`paths.best_params`), and the study's summary
(`paths.tune_summary`), a DVC metric.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.core.config import Params, load_stage_params, require_shared_storage
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.paths import staged_outputs
from pipeline.core.runtime import setup_logging, setup_tensorflow
from pipeline.tuning.session import describe, run_session, run_worker
from pipeline.tuning.space import best_overrides, validate_space
from pipeline.tuning.study import (
    best_params_record,
    finished_trials,
    open_study,
    study_summary,
    summary_metrics,
)

log = logging.getLogger("pipeline.tune")

# the params sections this stage reads (its dvc.yaml entry lists the same)
PARAMS = ("seed", "runtime", "preprocess", "tune", "presets.${tune.base_preset}", "tracking")  # one preset only


def write_results(study, params: Params) -> dict:
    """The best params and the study's summary, both or neither; returns the summary."""
    summary = study_summary(study, params.tune.base_preset)
    with staged_outputs() as staging:
        staging.path(params.paths.tune_summary).write_text(json.dumps(summary_metrics(summary), indent=2))
        record = best_params_record(summary, best_overrides(study, params.tune.space))
        staging.path(params.paths.best_params).write_text(json.dumps(record, indent=2))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline tune", description=__doc__.splitlines()[0])
    parser.add_argument("--more", type=int, default=0, metavar="N",
                        help="add N trials to the existing study beyond tune.n_trials")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="run the study in N local worker processes (default: tune.workers)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    worker = parser.add_argument_group("worker mode (`python -m pipeline tune-worker`)")
    worker.add_argument("--worker", action="store_true", help="join an existing study as one worker")
    worker.add_argument("--budget", type=int, default=0, help="finished trials the whole study stops at")
    worker.add_argument("--parent-run-id", default=None, help="MLflow run that trial runs nest under")
    worker.add_argument("--threads", type=int, default=0, help="TF threads for this worker (0: runtime params)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    params = load_stage_params("tune", PARAMS, args.params)
    validate_space(params.presets[params.tune.base_preset], params.tune.space)
    if args.more < 0 or args.workers < 0:
        raise PipelineError("--more and --workers take positive numbers")
    try:
        require_shared_storage(params.tune.storage, args.workers, "--workers")
    except ValueError as error:
        raise PipelineError(str(error)) from None
    runtime = params.runtime
    if args.threads:
        runtime = runtime.model_copy(update={"intra_op_threads": args.threads, "inter_op_threads": 1})
    setup_tensorflow(runtime, params.seed)
    if args.worker:
        run_worker(params, args.budget, args.parent_run_id)
        return 0
    study = open_study(params)
    remaining = args.more if args.more else max(params.tune.n_trials - finished_trials(study), 0)
    if remaining:
        run_session(params, remaining, params.tune.timeout_s, study,
                    workers=args.workers or params.tune.workers, params_path=args.params)
    else:
        log.info("study %s already has %d finished trials (tune.n_trials=%d); nothing to run",
                 study.study_name, finished_trials(study), params.tune.n_trials)
    summary = write_results(study, params)
    log.info("%s; wrote %s and %s", describe(summary), params.paths.best_params, params.paths.tune_summary)
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline tune-worker`: one worker joining the study named in params.yaml."""
    return main(["--worker", *(argv or [])])


if __name__ == "__main__":
    raise SystemExit(main())

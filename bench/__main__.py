"""`python -m bench train|pruning|workers|sprint|accuracy|serve`: run one benchmark, write <out>/<name>.json and <name>.md."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from bench.report import carry_sprint_section, write_results, write_sprint_section
from pipeline.commands.common import non_negative, positive
from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.runtime import setup_logging

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="reference vs default recipe: time to 99.0/99.5 %%, memory, inference")
    train.add_argument("--epochs-reference", type=positive(int), default=5, help="epochs for the reference (default 5)")
    train.add_argument("--epochs-default", type=positive(int), default=None,
                       help="epochs for the default recipe (default: params.yaml train.epochs)")
    train.add_argument("--train-limit", type=non_negative(int), default=0,
                       help="train on a stratified subset of N images (default 0: the whole training split)")
    train.add_argument("--test-limit", type=non_negative(int), default=0,
                       help="score on a stratified subset of N test images (default 0: all)")
    train.add_argument("--inference-seconds", type=positive(float), default=2.0,
                       help="time spent timing each inference batch size per model (default 2.0)")

    pruning = commands.add_parser("pruning", help="the tuning study with and without its pruner")
    pruning.add_argument("--trials", type=positive(int), default=None, help="trials per study (default: tune.n_trials)")
    pruning.add_argument("--train-images", type=positive(int), default=None, help="default: tune.train_images")
    pruning.add_argument("--val-images", type=positive(int), default=None, help="default: tune.val_images")
    pruning.add_argument("--epochs", type=positive(int), default=None, help="epochs per trial (default: tune.epochs)")
    pruning.add_argument("--pruner", choices=["hyperband", "successive_halving", "median"], default=None,
                         help="the pruner to measure (default: tune.pruner)")

    workers = commands.add_parser("workers", help="tuning throughput with 1 and 2 workers on one shared study")
    workers.add_argument("--storage", required=True,
                         help="an RDB URL both arms use, e.g. postgresql+psycopg://postgres@127.0.0.1/bench")
    workers.add_argument("--trials", type=positive(int), default=8, help="trials per arm (default 8)")

    sprint = commands.add_parser("sprint", help="presets.sprint vs the reference: training seconds to 99.0 %%, several seeds")
    sprint.add_argument("--seeds", type=positive(int), default=5, help="seeds, from params.yaml's seed up (default 5)")
    sprint.add_argument("--epochs-sprint", type=positive(int), default=2, help="epochs the sprint trains (default 2)")
    sprint.add_argument("--epochs-reference", type=positive(int), default=10,
                        help="most epochs the reference gets to reach 99.0 %% (default 10)")
    sprint.add_argument("--train-limit", type=non_negative(int), default=0, help="stratified training subset (0: all)")
    sprint.add_argument("--test-limit", type=non_negative(int), default=0, help="stratified test subset (0: all)")

    accuracy = commands.add_parser("accuracy", help="a preset over several seeds (validation-selected) and their ensemble")
    accuracy.add_argument("--preset", default="accurate", help="the preset to train (default: accurate)")
    accuracy.add_argument("--seeds", type=positive(int), default=3, help="seeds, from params.yaml's seed up (default 3)")
    accuracy.add_argument("--epochs", type=positive(int), default=30, help="most epochs per seed (default 30)")
    accuracy.add_argument("--patience", type=positive(int), default=None,
                          help="early-stopping patience on val_accuracy (default: --epochs, i.e. none)")
    accuracy.add_argument("--train-limit", type=non_negative(int), default=0, help="stratified training subset (0: all)")
    accuracy.add_argument("--test-limit", type=non_negative(int), default=0, help="stratified test subset (0: all)")
    accuracy.add_argument("--keep-models", type=Path, default=None,
                          help="a new folder to keep the seeds' models in (default: a temporary one)")

    serve = commands.add_parser("serve", help="`python -m pipeline serve` vs `mlflow models serve` of the champion")
    serve.add_argument("--requests", type=positive(int), default=300,
                       help="timed one-image requests per server (default 300)")
    serve.add_argument("--seconds", type=positive(float), default=15.0,
                       help="seconds per throughput measurement (default 15)")

    for command in (train, pruning, workers, sprint, accuracy, serve):
        command.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        command.add_argument("--out", type=Path, default=BENCH_DIR, help=f"output folder (default: {BENCH_DIR})")
    return parser.parse_args(argv)


def bench_train(args: argparse.Namespace, params) -> tuple[dict, str]:
    from bench.report import train_markdown
    from bench.training import make_jobs, run_train_benchmark

    jobs = make_jobs(params, args.epochs_reference, args.epochs_default, args.train_limit, args.test_limit,
                     args.inference_seconds)
    record = run_train_benchmark(params, jobs)
    return record, train_markdown(record)


def bench_pruning(args: argparse.Namespace, params) -> tuple[dict, str]:
    from bench.pruning import run_pruning_benchmark, with_tune
    from bench.report import pruning_markdown

    params = with_tune(params, n_trials=args.trials, train_images=args.train_images, val_images=args.val_images,
                       epochs=args.epochs, pruner=args.pruner)
    record = run_pruning_benchmark(params)
    return record, pruning_markdown(record)


def bench_workers(args: argparse.Namespace, params) -> tuple[dict, str]:
    from bench.workers import run_workers_benchmark, workers_markdown

    record = run_workers_benchmark(Path(args.params), args.storage, args.trials)
    return record, workers_markdown(record)


def bench_sprint(args: argparse.Namespace, params) -> tuple[dict, str]:
    from bench.report import sprint_markdown
    from bench.sprint import run_sprint_benchmark, sprint_jobs

    seeds = [params.seed + offset for offset in range(args.seeds)]
    jobs = sprint_jobs(params, seeds, args.epochs_sprint, args.epochs_reference, args.train_limit, args.test_limit)
    record = run_sprint_benchmark(params, jobs)
    return record, sprint_markdown(record)


def bench_accuracy(args: argparse.Namespace, params) -> tuple[dict, str]:
    from bench.accuracy import run_accuracy_benchmark
    from bench.report import accuracy_markdown

    seeds = [params.seed + offset for offset in range(args.seeds)]
    record = run_accuracy_benchmark(params, args.preset, seeds, args.epochs, args.patience or args.epochs,
                                    args.train_limit, args.test_limit, args.keep_models)
    return record, accuracy_markdown(record)


def bench_serve(args: argparse.Namespace, params) -> tuple[dict, str]:
    from bench.serving import run_serve_benchmark, serve_markdown
    from pipeline.core.data import load_split

    image = load_split(params.paths.test_split).x[0]
    record = run_serve_benchmark(params.tracking.registered_model, image, args.requests, args.seconds)
    return record, serve_markdown(record)


BENCHMARKS = {"train": bench_train, "pruning": bench_pruning, "workers": bench_workers, "sprint": bench_sprint,
              "accuracy": bench_accuracy, "serve": bench_serve}
OUTPUT_STEMS = {"train": "results", "pruning": "pruning", "workers": "workers", "sprint": "sprint", "accuracy": "accuracy",
                "serve": "serve"}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    if not Path(params.paths.train_split).is_file():
        raise PipelineError(f"{params.paths.train_split} is missing; run `dvc repro preprocess` first "
                            "(from the repository root)")
    record, markdown = BENCHMARKS[args.command](args, params)
    record = {"command": shlex.join(["python", "-m", "bench", *argv]), **record}
    stem = OUTPUT_STEMS[args.command]
    json_path, md_path = write_results(args.out, stem, carry_sprint_section(args.out, stem, record), markdown)
    print(markdown)
    log.info("wrote %s and %s", json_path, md_path)
    if args.command == "sprint":  # the ratio the README quotes, beside the train benchmark's
        log.info("wrote the sprint's summary into %s (key %r)", write_sprint_section(args.out, record), "sprint")


if __name__ == "__main__":
    main()

"""`python -m pipeline <command>`: the user-facing commands besides the DVC stages."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.config import load_params
from pipeline.errors import exit_on_user_error

# command -> (module, help); each module exposes main(argv) or cli(argv)
DELEGATED = {
    "tune": ("pipeline.tune", "run or extend the Optuna study (--more N adds trials, --workers N)"),
    "tune-worker": ("pipeline.tune:worker_main", "join the study in params.yaml as one more worker"),
    "predict": ("pipeline.predict", "predict digits in your own image files"),
    "web": ("pipeline.web", "serve a page to draw or upload a digit"),
    "serve": ("pipeline.serve", "serve the champion with MLflow's scoring app and a request-size limit"),
    "dashboard": ("pipeline.dashboard", "open optuna-dashboard on the study storage in params.yaml"),
}


def info_lines(params_path: str = "params.yaml") -> list[str]:
    """Where everything lives, one `key: value` per line."""
    from pipeline import tracking
    from pipeline.paths import project_root
    from pipeline.tune import resolve_storage_url, study_name

    params = load_params(params_path)
    root = project_root()
    return [
        f"project_root: {root}",
        f"tracking_uri: {tracking.tracking_uri()}",
        f"artifact_root: {tracking.default_artifact_root()}",
        f"experiment: {params.tracking.experiment}",
        f"registered_model: {params.tracking.registered_model}",
        f"champion_uri: models:/{params.tracking.registered_model}@champion",
        f"raw_data: {root / params.fetch.output}",
        f"prepared_data: {root / params.preprocess.output_dir}",
        f"model: {root / params.train.output_dir / 'model.keras'}",
        f"metrics: {root / params.evaluate.output_dir / 'evaluate.json'}",
        f"figures: {root / params.evaluate.figures_dir}",
        f"study_storage: {resolve_storage_url(params.tune.storage)}",
        f"study_name: {study_name(params)}",
        f"best_params: {root / params.tune.output}",
        f"study_summary: {root / params.tune.summary}",
    ]


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no versions)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def rescore_on_test(params):
    """A score(model_uri) -> accuracy function over the current test split, and its digest."""
    from pathlib import Path

    from pipeline.evaluate import make_scorer, test_data_digest
    from pipeline.preprocess import load_split

    test = load_split(Path(params.preprocess.output_dir) / "test.npz")
    return make_scorer(test, params.evaluate.batch_size), test_data_digest(test.x, test.y)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="MNIST pipeline commands")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print where the stores, data, model and metrics live")
    commands.add_parser("registry", help="list registered versions, aliases and metrics")
    promote = commands.add_parser("promote", help="promote a registered version to champion")
    promote.add_argument("--version", required=True, help="model version number")
    promote.add_argument("--force", action="store_true", help="promote even if it does not beat the champion")
    commands.add_parser("rollback", help="move champion back to the previous champion")
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        module_name, _, function = DELEGATED[argv[0]][0].partition(":")
        module = importlib.import_module(module_name)
        entry = getattr(module, function) if function else getattr(module, "cli", None) or module.main
        return entry(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0

    from pipeline import registry
    from pipeline.runtime import setup_logging

    setup_logging()
    params = load_params()
    name = params.tracking.registered_model
    if args.command == "registry":
        print(format_table(registry.version_rows(name)))
    elif args.command == "promote":
        score, digest = rescore_on_test(params)
        decision = registry.promote(name, args.version, params.promote.margin, digest, score, force=args.force)
        print(f"{name} v{args.version}: {decision.status}: {decision.reason}")
        return 0 if decision.promote else 1
    elif args.command == "rollback":
        previous, restored = registry.rollback_champion(registry.client(), name)
        print(f"{name}: champion moved back from v{previous} to v{restored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m pipeline <command>`: the user-facing commands besides the DVC stages.

Every command is a `main(argv) -> int` in the module that owns it; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.core.errors import exit_on_user_error, redact

# command -> ("module:function", help)
COMMANDS = {
    "info": ("pipeline.__main__:info_main", "print where the stores, data, model and metrics live"),
    "ui": ("pipeline.core.mlflow_ui:main", "open the MLflow UI on the project's tracking store"),
    "runs": ("pipeline.core.runs:main", "compare training runs: params, test and handwriting accuracy, version (--sort, --top)"),
    "registry": ("pipeline.core.registry:list_main", "list registered versions, aliases and metrics"),
    "promote": ("pipeline.core.registry:promote_main", "promote a registered version to champion (--version N)"),
    "rollback": ("pipeline.core.registry:rollback_main", "move champion back to the previous champion"),
    "tune": ("pipeline.tune:main", "run or extend the Optuna study (--more N adds trials, --workers N)"),
    "tune-worker": ("pipeline.tune:worker_main", "join the study in params.yaml as one more worker"),
    "dashboard": ("pipeline.tuning.dashboard:main", "open optuna-dashboard on the study storage in params.yaml"),
    "predict": ("pipeline.serving.predict:main", "predict digits in your own image files"),
    "serve": ("pipeline.serving.serve:main", "serve the champion with MLflow's scoring app and a request-size limit"),
    "web": ("pipeline.serving.web:main", "serve a page to draw or upload a digit"),
}


def info_lines(params_path: str = "params.yaml") -> list[str]:
    """Where everything lives, one `key: value` per line."""
    from pipeline.core import tracking
    from pipeline.core.config import load_params
    from pipeline.core.paths import project_root
    from pipeline.tuning.study import resolve_storage_url, study_name

    params = load_params(params_path)
    root = project_root()
    return [
        f"project_root: {root}",
        f"tracking_uri: {tracking.tracking_uri()}",
        f"artifact_root: {tracking.default_artifact_root()}",
        f"experiment: {params.tracking.experiment}",
        f"registered_model: {params.tracking.registered_model}",
        f"champion_uri: models:/{params.tracking.registered_model}@champion",
        f"study_storage: {resolve_storage_url(params.tune.storage)}",
        f"study_name: {study_name(params)}",
        *(f"paths.{key}: {root / value}" for key, value in params.paths.model_dump().items()),
    ]


@exit_on_user_error
def info_main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m pipeline info", description=COMMANDS["info"][1]).parse_args(argv)
    print(redact("\n".join(info_lines())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="MNIST pipeline commands "
                                     "(the stages run with `dvc repro`)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


# Commands that take the user's own file paths run where they are called; the others run in the project
# root, like the stages, so they work from any folder inside the project.
RUN_WHERE_CALLED = frozenset({"predict", "serve", "web"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage and exits 2 (or 0 for --help)
    if argv[0] not in RUN_WHERE_CALLED:
        from pipeline.core.paths import project_root

        os.chdir(project_root())
    module_name, function = COMMANDS[argv[0]][0].split(":")
    return getattr(importlib.import_module(module_name), function)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m pipeline <command>`: the user-facing commands besides the DVC stages.

Every command is a `main(argv) -> int` in the module that owns it; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


# command -> ("module:function", help)
COMMANDS = {
    "info": ("pipeline.commands.info:main", "print where the stores, data, model and metrics live"),
    "ui": ("pipeline.commands.ui:main", "open the MLflow UI on the project's tracking store"),
    "runs": ("pipeline.commands.runs:main", "compare training runs: params, test and handwriting accuracy, version (--sort, --top)"),
    "registry": ("pipeline.commands.registry:list_main", "list registered versions, aliases and metrics"),
    "promote": ("pipeline.commands.registry:promote_main", "promote a registered version to champion (--version N)"),
    "rollback": ("pipeline.commands.registry:rollback_main", "move champion back to the previous champion"),
    "tune": ("pipeline.tune:main", "run or extend the Optuna study (--more N adds trials, --workers N)"),
    "tune-worker": ("pipeline.tune:worker_main", "join the study in params.yaml as one more worker"),
    "dashboard": ("pipeline.commands.dashboard:main", "open optuna-dashboard on the study storage in params.yaml"),
    "predict": ("pipeline.commands.predict:main", "predict digits in your own image files"),
    "serve": ("pipeline.commands.serve:main", "serve the champion over MLflow's scoring protocol, with request limits"),
    "web": ("pipeline.commands.web:main", "serve a page to draw or upload a digit"),
    "feedback": ("pipeline.commands.feedback:main", "export users' labels from the prediction log as DVC-tracked training data"),
    "monitor": ("pipeline.commands.monitor:main", "compare the prediction log with the model's reference: drift report, exit 1 on drift"),
}


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

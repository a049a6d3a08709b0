"""`python -m pipeline feedback export`: users' labels from the prediction log, as DVC-tracked training data.

Writes `<paths.feedback>/feedback.npz` (every labelled picture, the last label given for each) and
runs `dvc add` on it; commit the `.dvc` file it updates, then `dvc repro` re-runs preprocess, tune,
train and evaluate on it. An unchanged export writes the same bytes, so `dvc repro` re-runs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.commands.common import log_storage_option, parser
from pipeline.core.errors import PipelineError, exit_on_user_error

log = logging.getLogger("pipeline.feedback")


def parse_args(argv: list[str] | None):
    command = parser("feedback", "Users' feedback on served answers, as versioned training data.")
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the labelled pictures to paths.feedback and `dvc add` them")
    log_storage_option(export)
    return command.parse_args(argv)


def dvc_add(path: Path) -> None:
    """Track the exported file with DVC (its .dvc file goes beside it, for git)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            repo.add(str(path))
    except DvcException as error:
        raise PipelineError(f"`dvc add {path}` failed ({error}); the file is written: run it by hand") from None


def export(storage: str, folder: Path) -> tuple[int, int, int]:
    """Write the labelled pictures (swapped in); returns (digits, not-digits, labels without pixels)."""
    from pipeline.core.paths import staged_outputs
    from pipeline.monitoring import feedback
    from pipeline.monitoring.log import make_engine, read_rows, store_problem

    try:
        rows = read_rows(make_engine(storage), columns=["id", "pixels"], labelled_only=True)
    except Exception as error:
        raise PipelineError(store_problem(storage, error)) from None
    labelled, without_pixels = feedback.from_rows(rows)
    with staged_outputs() as staging:
        feedback.save(labelled, staging.path(folder / feedback.FEEDBACK_FILE))
    return len(labelled.digits), len(labelled.nondigits), without_pixels


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from pipeline.commands.common import monitor_settings
    from pipeline.core.config import load_params
    from pipeline.core.runtime import setup_logging
    from pipeline.monitoring.feedback import FEEDBACK_FILE

    args = parse_args(argv)
    setup_logging()
    params = load_params()
    params.paths.require_safe()
    folder = Path(params.paths.feedback)
    digits, nondigits, without_pixels = export(monitor_settings(args.log_storage).storage, folder)
    target = folder / FEEDBACK_FILE
    dvc_add(target)
    if without_pixels:
        log.warning("%d labelled answers have no pixels (monitor.store_pixels was off when they were logged): "
                    "left out", without_pixels)
    print(f"exported {digits + nondigits} labelled pictures ({digits} digits, {nondigits} not a digit) to {target}; "
          f"commit {target}.dvc, then `dvc repro` trains on them")
    return 0

"""Where things live: the repository root, also from inside a `dvc exp run --temp` copy."""

from __future__ import annotations

import os
from pathlib import Path

_DVC_TEMP_EXPS = (".dvc", "tmp", "exps")


def project_root(start: Path | None = None) -> Path:
    """The user's repository root.

    `dvc exp run --temp` and `--queue` run in `<repo>/.dvc/tmp/exps/<tmpdir>/`; stores that must
    be shared across experiments (MLflow, Optuna) resolve to the outer repository.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - len(_DVC_TEMP_EXPS)):
        if parts[i : i + len(_DVC_TEMP_EXPS)] == _DVC_TEMP_EXPS:
            return Path(*parts[:i])
    return here


def resolve_in_project(path: str, start: Path | None = None) -> Path:
    """An absolute path for a project-relative setting (absolute ones pass through)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else project_root(start) / candidate


def publish(staging: Path, targets: dict[str, Path]) -> None:
    """Move finished files from a staging folder to their places (same filesystem: atomic renames),
    only once every one of them has been written."""
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)

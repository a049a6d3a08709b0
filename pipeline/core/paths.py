"""Where things live, and the one way every stage writes an output.

`project_root` is the user's repository, also from inside a `dvc exp run --temp` copy. Outputs
are written with `staged_outputs`: each file is written in a private folder beside its target and
swapped in only after every file of the stage is complete, so a crash leaves the old outputs as
they were.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError

_DVC_TEMP_EXPS = (".dvc", "tmp", "exps")
STAGING_PREFIX = ".staging-"  # a crashed stage's leftovers carry it (and are cleaned by the next run)


def project_root(start: Path | None = None) -> Path:
    """The user's repository root: the nearest folder up from `start` (the working folder) that holds
    `dvc.yaml`, so commands work from any subfolder; the working folder itself outside a project.

    `dvc exp run --temp` and `--queue` run in `<repo>/.dvc/tmp/exps/<tmpdir>/`; stores that must
    be shared across experiments (MLflow, Optuna) resolve to the outer repository.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - len(_DVC_TEMP_EXPS)):
        if parts[i : i + len(_DVC_TEMP_EXPS)] == _DVC_TEMP_EXPS:
            return Path(*parts[:i])
    return next((folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()), here)


def resolve_in_project(path: str, start: Path | None = None) -> Path:
    """An absolute path for a project-relative setting (absolute ones pass through)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else project_root(start) / candidate


SQLITE_PREFIX = "sqlite:///"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (Optuna storage, MLflow store), a relative path resolved in the
    user's repository (also under `dvc exp run --temp`); None for other databases."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    return resolve_in_project(url.removeprefix(SQLITE_PREFIX))


def path_problem(path: str) -> str | None:
    """Why `path` cannot be an output of a stage run in the working folder, or None.

    Refused: empty, the working folder itself, and anything that leaves it (`..`, absolute paths
    elsewhere, symlinks pointing out)."""
    if not path.strip():
        return "is empty"
    here = Path.cwd().resolve()
    target = (here / path).resolve()
    if target == here:
        return "is the working folder itself"
    if not target.is_relative_to(here):
        return f"is outside the working folder {here}"
    return None


def overlap(a: str, b: str) -> bool:
    """True when two paths are the same or one lies inside the other."""
    here = Path.cwd().resolve()
    first, second = (here / a).resolve(), (here / b).resolve()
    return first == second or first.is_relative_to(second) or second.is_relative_to(first)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_staging(folder: Path) -> list[Path]:
    """Remove the staging folders that killed stages left in `folder`: only ours (`.staging-<pid>-...`,
    made by `Staging`) and only those whose process is gone."""
    removed = []
    for leftover in folder.glob(f"{STAGING_PREFIX}*-*") if folder.is_dir() else []:
        owner = leftover.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if leftover.is_dir() and not leftover.is_symlink() and owner.isdigit() and not process_alive(int(owner)):
            shutil.rmtree(leftover)
            removed.append(leftover)
    return removed


class Staging:
    """New versions of output files, written beside their targets; `commit` swaps them all in
    (see `staged_outputs`)."""

    def __init__(self) -> None:
        self.pending: dict[Path, Path] = {}
        self.folders: dict[Path, Path] = {}  # target folder -> its private staging folder

    def path(self, target: str | Path) -> Path:
        """Where to write the new version of `target`: a private folder beside it (same filesystem,
        so the swap is a rename), under the target's own file name."""
        target = Path(target)
        if target not in self.pending:
            if target.parent not in self.folders:
                target.parent.mkdir(parents=True, exist_ok=True)
                clean_staging(target.parent)  # a killed run's leftovers go before this run stages anything
                self.folders[target.parent] = Path(tempfile.mkdtemp(dir=target.parent,
                                                                    prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
            self.pending[target] = self.folders[target.parent] / target.name
        return self.pending[target]

    def commit(self) -> None:
        """Swap every staged file in. `os.replace` is the swap: one atomic rename, after which the
        old file is gone and never before (a directory in a target's place is refused, untouched)."""
        missing = [str(target) for target, staged in self.pending.items() if not staged.is_file()]
        if missing:
            raise RuntimeError(f"staged outputs never written: {missing}")
        for target, staged in self.pending.items():
            if target.is_dir():
                raise PipelineError(f"{target} is a folder; an output must be a file path")
        for target, staged in self.pending.items():
            staged.chmod(0o644)
            os.replace(staged, target)
        self.discard()

    def discard(self) -> None:
        """Remove the staging folders (only ours: made by `path`)."""
        for folder in self.folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.pending.clear()
        self.folders.clear()


@contextlib.contextmanager
def staged_outputs() -> Iterator[Staging]:
    """Write a stage's outputs all or nothing:

        with staged_outputs() as staging:
            model.save(staging.path("models/model.keras"))
            ...
    Every file is swapped in when the block ends normally; on any error none is, and the staged
    files are removed."""
    staging = Staging()
    try:
        yield staging
        staging.commit()
    finally:
        staging.discard()


def require_safe_paths(paths: dict[str, str], inputs: frozenset[str] = frozenset()) -> None:
    """Refuse, before anything is touched, an output path that is empty, the working folder or
    outside it, and any path equal to, a parent of, or inside another (each has its own);
    `inputs` name the keys that are only read."""
    for key, path in paths.items():
        problem = None if key in inputs else path_problem(path)
        if problem:
            raise PipelineError(f"bad parameter in params.yaml: paths.{key}: {path!r} {problem}; "
                                "set it to a file path inside the project, like the defaults in params.yaml")
    for index, (key, path) in enumerate(paths.items()):
        for other_key, other in list(paths.items())[index + 1:]:
            if overlap(path, other):
                raise PipelineError(f"bad parameter in params.yaml: paths.{key}: {path!r} overlaps paths.{other_key} "
                                    f"({other!r}); give every input and output a path of its own")

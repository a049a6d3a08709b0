"""What optuna-dashboard opens: the study storage that params.yaml names.

Resolves `tune.storage` as the tune stage does (a relative SQLite path lives in the repository
root) and refuses, in one line, a SQLite file that does not exist yet (no `dvc repro` has run the
study on this machine), where optuna-dashboard would otherwise create an empty database or fail
with a traceback.
"""

from __future__ import annotations

from pipeline.core.errors import PipelineError
from pipeline.tuning.study import resolve_storage_url, sqlite_file


def storage_for_dashboard(url: str) -> str:
    """The storage URL to open, with a relative SQLite path made absolute; a missing file is an error."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise PipelineError(f"no Optuna study database at {path} yet; run `dvc repro -f tune` (or "
                            "`python -m pipeline tune`) to run the study on this machine")
    return resolve_storage_url(url)


def study_names(storage: str) -> list[str]:
    import optuna

    return [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]

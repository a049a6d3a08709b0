"""optuna-dashboard on the study storage that params.yaml names.

    python -m pipeline dashboard [--params params.yaml] [--host 127.0.0.1] [--port 8080]

Resolves `tune.storage` as the tune stage does (a relative SQLite path lives in the repository
root) and refuses, in one line, a SQLite file that does not exist yet (no `dvc repro` has run the
study on this machine), where optuna-dashboard would otherwise create an empty database or fail
with a traceback.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.runtime import setup_logging
from pipeline.tuning.study import resolve_storage_url, sqlite_file, study_name

log = logging.getLogger("pipeline.tuning.dashboard")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    storage = storage_for_dashboard(params.tune.storage)
    current = study_name(params)
    try:
        names = study_names(storage)
    except Exception as error:
        raise PipelineError(f"cannot read Optuna storage {params.tune.storage} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:160]}); start the database or fix tune.storage") from None
    if current not in names:
        log.warning("study %s (the current params) is not in this storage yet; %d other studies are", current,
                    len(names))
    log.info("optuna-dashboard on %s, current study %s: http://%s:%d", storage, current, args.host, args.port)

    from optuna_dashboard import run_server

    run_server(storage, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
